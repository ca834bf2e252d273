"""Routing notifications to targets by field, WABA and phone number (gateway.edge.routing)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway.config import TargetConfig
from gateway.edge.routing import Route, parse, route
from gateway.errors import BadRequest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _target(name: str, **filters: Any) -> TargetConfig:
    return TargetConfig(name=name, url=f"http://127.0.0.1/{name}", **filters)


def _change(
    field: str, *, phone: str | None = None, waba_info: str | None = None
) -> dict[str, Any]:
    value: dict[str, Any] = {"messaging_product": "whatsapp"}
    if phone is not None:
        value["metadata"] = {"display_phone_number": "15550000000", "phone_number_id": phone}
    if waba_info is not None:
        value["waba_info"] = {"waba_id": waba_info}
    return {"field": field, "value": value}


BATCH: dict[str, Any] = {
    "object": "whatsapp_business_account",
    "entry": [
        {
            "id": "WABA1",
            "changes": [_change("messages", phone="P1"), _change("messages", phone="P2")],
        },
        {"id": "WABA2", "time": 1700000000, "changes": [_change("message_template_status_update")]},
        {
            "id": "BIZ9",
            "time": 1700000001,
            "changes": [_change("account_update", waba_info="WABA3")],
        },
    ],
}


@pytest.mark.parametrize(
    ("target", "expected_count"),
    [
        pytest.param(_target("all"), 1, id="no-filters-gets-everything"),
        pytest.param(_target("msgs", fields=("messages",)), 1, id="field-match"),
        pytest.param(_target("none", fields=("security",)), 0, id="field-miss"),
        pytest.param(_target("w2", waba_ids=("WABA2",)), 1, id="waba-by-entry-id"),
        pytest.param(_target("w3", waba_ids=("WABA3",)), 1, id="waba-by-waba-info"),
        pytest.param(_target("w4", waba_ids=("WABA4",)), 0, id="waba-miss"),
        pytest.param(_target("p2", phone_number_ids=("P2",)), 1, id="phone-match"),
        pytest.param(_target("p3", phone_number_ids=("P3",)), 0, id="phone-miss"),
        pytest.param(
            _target("and", fields=("messages",), waba_ids=("WABA2",)), 0, id="filters-are-and"
        ),
        pytest.param(
            _target("both", fields=("messages", "account_update"), waba_ids=("WABA3",)),
            1,
            id="or-within-a-filter",
        ),
    ],
)
def test_split_none_routes_whole_body_when_any_change_matches(
    target: TargetConfig, expected_count: int
) -> None:
    """split="none" sends the received bytes once when at least one change matches."""
    routes = route(BATCH, [target])
    assert routes == [Route(target.name, None)] * expected_count


@pytest.mark.parametrize(
    ("target", "expected_fields"),
    [
        pytest.param(
            _target("all", split="change"),
            ["messages", "messages", "message_template_status_update", "account_update"],
            id="every-change",
        ),
        pytest.param(
            _target("p1", split="change", phone_number_ids=("P1",)), ["messages"], id="one-phone"
        ),
        pytest.param(
            _target("w3", split="change", waba_ids=("WABA3",)), ["account_update"], id="partner"
        ),
        pytest.param(_target("none", split="change", fields=("security",)), [], id="nothing"),
    ],
)
def test_split_change_sends_one_minimal_envelope_per_matching_change(
    target: TargetConfig, expected_fields: list[str]
) -> None:
    """split="change" makes one envelope per matching change, keeping object, id and time."""
    routes = route(BATCH, [target])
    documents = [json.loads(r.body or b"") for r in routes]
    assert [d["entry"][0]["changes"][0]["field"] for d in documents] == expected_fields
    for document in documents:
        assert document["object"] == "whatsapp_business_account"
        assert len(document["entry"]) == 1
        assert len(document["entry"][0]["changes"]) == 1


def test_split_change_keeps_time_only_where_meta_sent_it() -> None:
    """entry.time is copied when present (management fields) and absent for messages."""
    routes = route(BATCH, [_target("all", split="change")])
    entries = [json.loads(r.body or b"")["entry"][0] for r in routes]
    assert [("time" in e) for e in entries] == [False, False, True, True]
    assert entries[2]["time"] == 1700000000
    assert entries[3]["id"] == "BIZ9"


def test_split_change_keeps_ascii_escapes_like_meta() -> None:
    """Envelopes escape non-ASCII text as Meta does, so no raw UTF-8 reaches the target."""
    payload = {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "W",
                "changes": [{"field": "messages", "value": {"text": "Caf\u00e9 \U0001f62e"}}],
            }
        ],
    }
    (only,) = route(payload, [_target("t", split="change")])
    assert only.body is not None
    assert b"\\u00e9" in only.body
    assert b"\\ud83d\\ude2e" in only.body
    assert (
        json.loads(only.body)["entry"][0]["changes"][0]["value"]["text"] == "Caf\u00e9 \U0001f62e"
    )


@pytest.mark.parametrize(
    "payload",
    [[], "text", 42, {"object": "x"}, {"entry": "nope"}, {"entry": [1, {"changes": [2]}]}],
    ids=["list", "string", "number", "no-entry", "entry-not-list", "junk-items"],
)
def test_unknown_shapes_reach_only_unfiltered_whole_body_targets(payload: Any) -> None:
    """A signed body of unknown shape is kept for unfiltered targets, never crashes routing."""
    targets = [
        _target("all"),
        _target("msgs", fields=("messages",)),
        _target("split", split="change"),
    ]
    assert route(payload, targets) == [Route("all", None)]


def test_numeric_ids_still_match_string_filters() -> None:
    """An id sent as a number matches the same id written as a string in the config."""
    payload = {"entry": [{"id": 123, "changes": [{"field": "messages", "value": {}}]}]}
    assert route(payload, [_target("w", waba_ids=("123",))]) == [Route("w", None)]


def test_routes_follow_target_order() -> None:
    """Routes come out in configuration order, one per target."""
    targets = [_target("b"), _target("a")]
    assert [r.target for r in route(BATCH, targets)] == ["b", "a"]


# -- parsing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            b'{"object":"whatsapp_business_account"}',
            {"object": "whatsapp_business_account"},
            id="plain",
        ),
        pytest.param(b'{"t":"\\ud83d\\ude00"}', {"t": "\U0001f600"}, id="escaped surrogate pair"),
        pytest.param(b'{"t":"\\ud800"}', {"t": "\ud800"}, id="lone surrogate, as json accepts it"),
        pytest.param(b'{"n":12345678901234567890}', {"n": 12345678901234567890}, id="big integer"),
        pytest.param('{"t":"caf\u00e9"}'.encode(), {"t": "caf\u00e9"}, id="raw UTF-8"),
    ],
)
def test_parse_accepts_what_the_json_module_accepts(body: bytes, expected: Any) -> None:
    assert parse(body) == expected


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"{", id="truncated"),
        pytest.param(b"\xff\xfe{}", id="not UTF-8"),
        pytest.param(b"object=whatsapp", id="form encoded"),
    ],
)
def test_parse_refuses_what_is_not_json_with_400(body: bytes) -> None:
    with pytest.raises(BadRequest, match="not valid JSON"):
        parse(body)


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.json")), ids=lambda path: path.stem)
def test_parse_reads_every_meta_sample_as_the_json_module_does(example: Path) -> None:
    body = example.read_bytes()
    assert parse(body) == json.loads(body)
