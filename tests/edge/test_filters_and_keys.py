"""The pure decisions behind content filters and conversation order (gateway.edge.filters,
gateway.edge.ordering), then routing with them on Meta's samples and their business-scoped
user id versions (examples/bsuid/: phone number fields removed, user id fields added)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway.config import TargetConfig
from gateway.edge.filters import matches_content, message_types, statuses
from gateway.edge.ordering import conversation_key, user_of
from gateway.edge.routing import iter_changes, route, split_changes

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BSUID = EXAMPLES / "bsuid"
USER = "US.13491208655302741918"


def _value(**arrays: Any) -> dict[str, Any]:
    return {"messaging_product": "whatsapp", **arrays}


TEXT = _value(messages=[{"type": "text"}])
IMAGE_AND_TEXT = _value(messages=[{"type": "image"}, {"type": "text"}])
FAILED = _value(statuses=[{"status": "failed"}])
READ = _value(statuses=[{"status": "read"}])
EVENT = {"event": "APPROVED"}


@pytest.mark.parametrize(
    ("value", "types", "wanted_statuses", "expected"),
    [
        (TEXT, (), (), True),
        (EVENT, (), (), True),
        (TEXT, ("text",), (), True),
        (TEXT, ("image",), (), False),
        (IMAGE_AND_TEXT, ("text",), (), True),
        (FAILED, ("text",), (), False),
        (EVENT, ("text",), (), False),
        (FAILED, (), ("failed",), True),
        (READ, (), ("failed",), False),
        (TEXT, (), ("failed",), False),
        (EVENT, (), ("read",), False),
        (_value(messages=[{"type": "edit"}]), ("edit",), (), True),
        (_value(messages=[{"type": 3}, "x"]), ("text",), (), False),
        (_value(messages="text"), ("text",), (), False),
        (None, ("text",), (), False),
        (None, (), (), True),
    ],
)
def test_content_filters_match_by_message_type_and_status(
    value: Any, types: tuple[str, ...], wanted_statuses: tuple[str, ...], expected: bool
) -> None:
    """A set filter matches when one message has a listed type (one status a listed status);
    an empty one matches all; a change without messages or statuses matches no set filter."""
    assert matches_content(value, types, wanted_statuses) is expected


def test_content_reads_every_type_and_status_and_skips_other_shapes() -> None:
    """Every messages[].type and statuses[].status is read; anything else is skipped."""
    assert message_types(IMAGE_AND_TEXT) == {"image", "text"}
    assert statuses(_value(statuses=[{"status": "sent"}, {"status": "read"}, {}])) == {
        "sent",
        "read",
    }
    assert message_types([1]) == set()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (_value(messages=[{"from": "1650", "from_user_id": "US.1"}]), "u:US.1"),
        (_value(messages=[{"from_user_id": "US.1"}]), "u:US.1"),
        (_value(messages=[{"from": "1650"}]), "p:1650"),
        (
            _value(contacts=[{"wa_id": "1650", "user_id": "US.1"}], messages=[{"from": "1650"}]),
            "u:US.1",
        ),
        (_value(contacts=[{"wa_id": "1650"}], messages=[{"type": "system"}]), "p:1650"),
        (_value(statuses=[{"recipient_id": "1650", "recipient_user_id": "US.1"}]), "u:US.1"),
        (_value(statuses=[{"recipient_id": "1650"}]), "p:1650"),
        (_value(statuses=[{"recipient_id": 1650}]), "p:1650"),
        (_value(user_id="US.1"), "u:US.1"),
        (EVENT, None),
        (_value(messages=[{"from": ""}]), None),
        (_value(messages=[]), None),
        ("text", None),
    ],
)
def test_a_change_s_user_is_its_bsuid_else_its_phone_number(value: Any, expected: str) -> None:
    """The business-scoped user id wins wherever the change carries it; else the phone
    number; a change naming no user has none."""
    assert user_of(value) == expected


def test_conversation_keys_tell_users_numbers_and_accounts_apart() -> None:
    """One user on one phone number is one key; another user, another business number or
    another WABA's events are other keys; the key never holds the ids themselves."""
    message = _value(messages=[{"from_user_id": USER}])
    status = _value(statuses=[{"recipient_user_id": USER, "recipient_id": "1650"}])
    key = conversation_key(message, "P1", "W1")
    assert key == conversation_key(status, "P1", "W1")
    assert key != conversation_key(message, "P2", "W1")
    assert key != conversation_key(_value(messages=[{"from_user_id": "US.2"}]), "P1", "W1")
    assert conversation_key(EVENT, None, "W1") == conversation_key(EVENT, None, "W1")
    assert conversation_key(EVENT, None, "W1") != conversation_key(EVENT, None, "W2")
    assert USER not in key
    assert "P1" not in key
    assert len(key) == 32


def _target(name: str, **settings: Any) -> TargetConfig:
    return TargetConfig(name=name, url=f"http://127.0.0.1/{name}", **settings)


def _sample(path: Path) -> bytes:
    """A sample as Meta sends it: compact."""
    return json.dumps(json.loads(path.read_bytes()), separators=(",", ":")).encode()


@pytest.mark.parametrize("name", sorted(p.name for p in BSUID.glob("*.json")))
def test_bsuid_samples_hold_no_phone_number_of_the_user(name: str) -> None:
    """The BSUID samples are Meta's with the user's phone number fields removed."""
    text = (BSUID / name).read_text()
    for field in ('"from"', '"wa_id"', '"recipient_id"'):
        assert field not in text


@pytest.mark.parametrize(
    ("sample", "plain"),
    [
        ("messages-text.json", "messages-text.json"),
        ("messages-image.json", "messages-image.json"),
        ("statuses-delivered.json", "statuses-delivered.json"),
        ("statuses-read.json", "statuses-read.json"),
        ("statuses-failed.json", "statuses-failed.json"),
    ],
)
def test_bsuid_samples_route_split_and_filter_like_their_phone_number_originals(
    sample: str, plain: str
) -> None:
    """Without ``from`` or ``wa_id``, a notification goes to the same targets, in the same
    parts, as the sample it was made from; ordered targets key it by the user id."""
    targets = [
        _target("all"),
        _target("texts", message_types=("text",), split="change"),
        _target("failures", statuses=("failed",)),
        _target("phone", phone_number_ids=("106540352242922",)),
        _target("ordered", order="conversation", split="change"),
    ]
    bsuid, original = _sample(BSUID / sample), _sample(EXAMPLES / plain)
    got = route(bsuid, targets)
    expected = route(original, targets)
    assert [(r.target, r.body is None) for r in got] == [
        (r.target, r.body is None) for r in expected
    ]
    (ordered,) = [r for r in got if r.target == "ordered"]
    (change,) = list(iter_changes(json.loads(bsuid)))
    assert ordered.key == conversation_key(change.value, change.phone_number_id, change.entry_id)
    assert user_of(change.value) == f"u:{USER}"


@pytest.mark.parametrize(
    ("sample", "field"),
    [
        ("user_id_update.json", "user_id_update"),
        ("business_username_update.json", "business_username_update"),
    ],
)
def test_new_bsuid_fields_route_by_field(sample: str, field: str) -> None:
    """user_id_update and business_username_update reach the targets that list them (or
    list no field), not the others."""
    body = _sample(BSUID / sample)
    targets = [_target("it", fields=(field,)), _target("messages", fields=("messages",))]
    targets.append(_target("all", order="conversation"))
    assert [(r.target, r.key is not None) for r in route(body, targets)] == [
        ("it", False),
        ("all", True),
    ]


def test_split_change_sends_only_the_changes_the_content_filters_match() -> None:
    """With split = "change", a notification of a text message, an image and a failed status
    sends each filtered target only its matching changes, each keyed by its own user when
    the target is ordered."""
    changes = [
        {"field": "messages", "value": _value(metadata={"phone_number_id": "P"}, **spec)}
        for spec in (
            {"messages": [{"type": "text", "from_user_id": "US.1"}]},
            {"messages": [{"type": "image", "from_user_id": "US.2"}]},
            {"statuses": [{"status": "failed", "recipient_user_id": "US.1"}]},
        )
    ]
    body = json.dumps(
        {"object": "whatsapp_business_account", "entry": [{"id": "W", "changes": changes}]}
    ).encode()
    parts = [c.part for c in split_changes(body)]
    texts = _target("texts", message_types=("text",), split="change", order="conversation")
    failed = _target("failed", statuses=("failed",), split="change")
    whole = _target("whole", statuses=("failed",))
    routes = route(body, [texts, failed, whole])
    assert [(r.target, r.body) for r in routes] == [
        ("texts", parts[0]),
        ("failed", parts[2]),
        ("whole", None),
    ]
    assert routes[0].key == conversation_key(changes[0]["value"], "P", "W")
    assert routes[0].key == conversation_key(changes[2]["value"], "P", "W")
    assert routes[1].key is None


def test_split_none_with_order_keys_a_notification_by_its_first_matching_change() -> None:
    """A whole notification is keyed by its first change that matches the target."""
    changes = [
        {"field": "messages", "value": _value(metadata={"phone_number_id": p}, **spec)}
        for p, spec in (
            ("P1", {"messages": [{"type": "text", "from_user_id": "US.1"}]}),
            ("P2", {"messages": [{"type": "text", "from_user_id": "US.2"}]}),
        )
    ]
    body = json.dumps({"object": "x", "entry": [{"id": "W", "changes": changes}]}).encode()
    (whole,) = route(body, [_target("t", order="conversation")])
    assert whole.key == conversation_key(changes[0]["value"], "P1", "W")
    (second,) = route(body, [_target("t", order="conversation", phone_number_ids=("P2",))])
    assert second.key == conversation_key(changes[1]["value"], "P2", "W")
