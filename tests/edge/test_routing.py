"""Routing notifications to targets by field, WABA and phone number, and splitting them into one
complete payload per change (gateway.edge.routing)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from gateway.config import TargetConfig
from gateway.edge.routing import NO_CONVERSATION, Plan, iter_changes, parse, route, split_changes
from gateway.errors import BadRequest, NestedTooDeep
from gateway.outbox import Route

# Meta's published samples, byte for byte as Meta publishes them (examples/).
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _body(payload: Any) -> bytes:
    """``payload`` as Meta sends it: compact, non-ASCII text escaped."""
    return json.dumps(payload, ensure_ascii=True, separators=(",", ":")).encode()


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


BATCH_PAYLOAD: dict[str, Any] = {
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
BATCH = _body(BATCH_PAYLOAD)


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


def test_split_change_keeps_meta_escapes_as_sent() -> None:
    """A part holds Meta's escapes (``\\u00e9``, ``\\/``, surrogates) as sent, not re-serialised."""
    body = (
        rb'{"object":"whatsapp_business_account","entry":[{"id":"W","changes":[{"field":"messages",'
        rb'"value":{"text":"Caf\u00e9 \/ \ud83d\ude2e"}}]}]}'
    )
    (only,) = route(body, [_target("t", split="change")])
    assert only.body == body
    assert json.loads(only.body)["entry"][0]["changes"][0]["value"]["text"] == (
        "Caf\u00e9 / \U0001f62e"
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
    assert route(_body(payload), targets) == [Route("all", None)]


def test_numeric_ids_still_match_string_filters() -> None:
    """An id sent as a number matches the same id written as a string in the config."""
    payload = {"entry": [{"id": 123, "changes": [{"field": "messages", "value": {}}]}]}
    assert route(_body(payload), [_target("w", waba_ids=("123",))]) == [Route("w", None)]


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


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            b'{"n":123456789012345678901234567890}', 123456789012345678901234567890, id="30 digits"
        ),
        pytest.param(b'{"n":36893488147419103232}', 2**65, id="timestamp wider than 2**64"),
        pytest.param(b'{"n":18446744073709551616}', 2**64, id="2**64, one past orjson"),
        pytest.param(b'{"n":18446744073709551615}', 2**64 - 1, id="2**64 - 1, orjson's widest"),
        pytest.param(b'{"n":-9223372036854775809}', -(2**63) - 1, id="one below -2**63"),
        pytest.param(
            b'{"n":-98765432109876543210987654321}',
            -98765432109876543210987654321,
            id="negative, 29 digits",
        ),
        pytest.param(
            b'{"t":"1234567890123456789012","n":99999999999999999999999}',
            99999999999999999999999,
            id="after a long digit run in a string",
        ),
    ],
)
def test_parse_reads_integers_of_any_width_exactly(body: bytes, expected: int) -> None:
    """An integer orjson would turn into a float comes out as the exact int json reads."""
    payload = parse(body)
    assert type(payload["n"]) is int
    assert payload["n"] == expected
    assert payload == json.loads(body)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"[" * 5000 + b"]" * 5000, id="arrays"),
        pytest.param(b'{"a":' * 3000 + b"1" + b"}" * 3000, id="objects"),
        pytest.param(
            b'{"object":"o","entry":[{"id":"W","changes":[{"field":"f","value":'
            + b"[" * 1100
            + b"]" * 1100
            + b"}]}]}",
            id="one change deeper than orjson reads",
        ),
    ],
)
def test_valid_json_nested_beyond_the_parser_goes_to_catch_all_targets_only(body: bytes) -> None:
    """Valid JSON too deep to read is not refused: the targets that take every notification
    get it as sent; those that filter or split cannot read its changes and do not."""
    targets = [_target("all"), _target("filtered", fields=("f",)), _target("split", split="change")]
    assert route(body, targets) == [Route("all", None)]


def _deep_change(depth: int, extra: bytes = b"1") -> bytes:
    """One messages change whose value holds arrays ``depth`` deep and ``extra`` (the body is
    ``depth + 7`` levels deep in all)."""
    return (
        b'{"object":"whatsapp_business_account","entry":[{"id":"W","changes":[{"field":"messages",'
        b'"value":{"metadata":{"phone_number_id":"P"},"deep":'
        + b"[" * depth
        + b"]" * depth
        + b',"n":'
        + extra
        + b"}}]}]}"
    )


WHOLE_BODY_TARGETS = [
    _target("all"),
    _target("filtered", fields=("messages",)),
    _target("ordered", order="conversation"),
    _target("ordered-filtered", order="conversation", phone_number_ids=("P",)),
]


@pytest.mark.parametrize("depth", [900, 980, 985, 990, 995, 1000, 1005, 1010, 1017, 1018, 1030])
@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(b"1", id="orjson reads it"),
        pytest.param(b'"\\ud800"', id="a lone surrogate: json reads it"),
    ],
)
def test_a_split_target_never_changes_what_the_whole_body_targets_receive(
    depth: int, extra: bytes
) -> None:
    """Routing is per target: adding a split target changes nothing the others receive, at
    every depth around json's limit (about 1,000 levels, less the caller's stack) and orjson's
    (1,024 levels). A body too deep to split but not to parse goes to the whole-body targets
    whose filters it matches, as it does without a split target."""
    body = _deep_change(depth, extra)
    alone = route(body, WHOLE_BODY_TARGETS)
    with_split = route(body, [*WHOLE_BODY_TARGETS, _target("split", split="change")])
    assert [r for r in with_split if r.target != "split"] == alone


def test_a_split_target_only_adds_to_what_others_receive_of_a_deep_body_with_a_wide_integer() -> (
    None
):
    """An integer of 19 digits or more is read by json, to keep it exact: the whole body
    without a split target, each change alone with one. So a split target may let the others
    read a body a few levels deeper, never take one away."""
    for depth in range(970, 1010):
        body = _deep_change(depth, b"12345678901234567890123")
        alone = route(body, WHOLE_BODY_TARGETS)
        with_split = route(body, [*WHOLE_BODY_TARGETS, _target("split", split="change")])
        others = [r for r in with_split if r.target != "split"]
        assert set(alone) <= set(others), depth


@pytest.mark.parametrize("depth", [1000, 1010, 1017])
@pytest.mark.parametrize("stack", [0, 200])
def test_a_change_orjson_reads_is_split_whatever_the_callers_stack(depth: int, stack: int) -> None:
    """json reads only as deep as the stack leaves room for; a change it cannot read there is
    read again with orjson, whose limit does not depend on the caller, so a split target gets
    its part (here the body itself: one compact change) from any call depth."""
    body = _deep_change(depth)

    def nested(levels: int) -> list[Route]:
        if levels:
            return nested(levels - 1)
        return route(body, [_target("split", split="change")])

    assert nested(stack) == [Route("split", body)]


def test_a_change_deeper_than_orjson_reads_reaches_no_split_target() -> None:
    """Beyond 1,024 levels neither parser reads the change: the unfiltered whole-body targets
    get the body, no split or filtered target does."""
    body = _deep_change(1100)
    targets = [*WHOLE_BODY_TARGETS, _target("split", split="change")]
    assert route(body, targets) == [
        Route("all", None),
        Route("ordered", None, NO_CONVERSATION),
    ]


NO_CHANGE_TO_KEY: dict[str, bytes] = {
    "no entries": _body({"object": "whatsapp_business_account", "entry": []}),
    "an entry without changes": _body(
        {"object": "whatsapp_business_account", "entry": [{"id": "W", "changes": []}]}
    ),
    "an entry without a changes key": _body({"entry": [{"id": "W"}]}),
    "junk items": _body({"entry": [1, {"changes": [2]}]}),
    "an unknown envelope": _body({"object": "x"}),
    "a list": _body([]),
    "a string": _body("text"),
    "valid JSON too deep to read": b"[" * 5000 + b"]" * 5000,
    "a change too deep to read": _deep_change(1100),
}


@pytest.mark.parametrize("body", NO_CHANGE_TO_KEY.values(), ids=NO_CHANGE_TO_KEY.keys())
@pytest.mark.parametrize("plan", [False, True], ids=["targets", "plan"])
def test_an_ordered_unfiltered_target_receives_a_notification_with_no_change_to_key(
    body: bytes, plan: bool
) -> None:
    """Ordering is no filter: an unfiltered whole-body target receives every notification,
    ordered or not; one with no change to key it by is keyed NO_CONVERSATION. Filtered and
    split targets, ordered or not, do not receive it."""
    targets = [
        _target("all"),
        _target("ordered", order="conversation"),
        _target("filtered", order="conversation", fields=("messages",)),
        _target("split", order="conversation", split="change"),
    ]
    routes = route(body, Plan.of(targets) if plan else targets)
    assert routes == [Route("all", None), Route("ordered", None, NO_CONVERSATION)]


def test_notifications_with_no_change_to_key_share_one_key_of_their_own() -> None:
    """The key is not None, which the outbox reads as "no order to keep" (such notifications
    would overtake one another): they keep the order they came in among themselves. It is no
    conversation's key either, so none of Meta's samples waits behind them."""
    target = [_target("ordered", order="conversation")]
    keys = {r.key for body in NO_CHANGE_TO_KEY.values() for r in route(body, target)}
    assert keys == {NO_CONVERSATION}
    sample_keys = {
        r.key
        for example in sorted(EXAMPLES.glob("*.json"))
        for r in route(example.read_bytes(), target)
    }
    assert sample_keys
    assert None not in sample_keys
    assert NO_CONVERSATION not in sample_keys


def test_parse_says_valid_json_beyond_both_parsers_is_too_deep() -> None:
    """Beyond orjson's 1,024 levels and json's limit, parse tells "too deep" from "invalid"."""
    with pytest.raises(NestedTooDeep):
        parse(b"[" * 5000 + b"]" * 5000)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"[" * 5000 + b"]" * 4999, id="one bracket short"),
        pytest.param(b"[" * 5000 + b"}" * 5000, id="mismatched"),
        pytest.param(b"[" * 5000 + b"x" + b"]" * 5000, id="a bad value deep inside"),
    ],
)
def test_invalid_json_nested_deeply_is_refused_as_invalid_by_parse(body: bytes) -> None:
    """parse calls deep invalid JSON invalid, not too deep."""
    with pytest.raises(BadRequest, match="not valid JSON"):
        parse(body)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"[" * 5000 + b"]" * 4999, id="one bracket short"),
        pytest.param(b"[" * 5000 + b"}" * 5000, id="mismatched"),
        pytest.param(b"[" * 5000 + b"x" + b"]" * 5000, id="a bad value deep inside"),
    ],
)
def test_invalid_json_nested_deeply_is_refused_as_invalid(body: bytes) -> None:
    """Deep but not JSON: a 400 that says the body is not JSON, never a crash."""
    with pytest.raises(BadRequest, match="not valid JSON"):
        route(body, [_target("all")])


def test_a_5000_digit_integer_is_valid_json_kept_exactly() -> None:
    """Beyond Python's 4,300-digit int conversion limit a number is still JSON: it is read
    exactly, and a split part carries its original text."""
    digits = "9" * 5000
    body = f'{{"object":"o","entry":[{{"id":"W","changes":[{{"field":"f","value":{digits}}}]}}]}}'
    payload = parse(body.encode())
    assert str(payload["entry"][0]["changes"][0]["value"]) == digits
    (part,) = route(body.encode(), [_target("split", split="change")])
    assert part.body is not None
    assert digits.encode() in part.body
    assert route(body.encode(), [_target("all")]) == [Route("all", None)]


@pytest.mark.parametrize(
    "targets",
    [
        pytest.param([_target("all")], id="one catch-all target"),
        pytest.param([_target("a"), _target("b")], id="two catch-all targets"),
        pytest.param([_target("split", split="change")], id="a split target"),
        pytest.param([_target("msgs", fields=("messages",))], id="a filtered target"),
    ],
)
def test_route_refuses_what_is_not_json_with_400(targets: list[TargetConfig]) -> None:
    """Whatever the targets, a body that is not JSON is a 400 (Meta's retries cannot fix it)."""
    with pytest.raises(BadRequest, match="not valid JSON"):
        route(b'{"object":', targets)


# -- split = "change": exact parts ---------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            rb'{"object":"whatsapp_business_account","entry":[{"id":123456789012345678901234567890,'
            rb'"changes":[{"field":"messages","value":{"n":1}}]}]}',
            id="30-digit entry id",
        ),
        pytest.param(
            rb'{"object":"o","entry":[{"id":"W","time":36893488147419103232,'
            rb'"changes":[{"field":"f","value":{"ts":18446744073709551616}}]}]}',
            id="timestamps wider than 2**64",
        ),
        pytest.param(
            rb'{"object":"o","entry":[{"id":"W","changes":[{"field":"f",'
            rb'"value":{"n":-98765432109876543210987654321,"x":1.0E+2,"z":-0.0}}]}]}',
            id="negative huge int, numbers as written",
        ),
        pytest.param(
            rb'{"object":"o","entry":[{"id":"W","changes":[{"field":"f","value":'
            rb'{"t":"\ud83d\ude00 \u00e9 https:\/\/x.example\/a \"q\" \u003C\u0040"}}]}]}',
            id="escapes as Meta writes them",
        ),
        pytest.param(
            '{"object":"o","entry":[{"id":"W","changes":[{"field":"f","value":'
            '{"t":"caf\u00e9 \U0001f600 \u2028"}}]}]}'.encode(),
            id="raw UTF-8",
        ),
        pytest.param(
            rb'{"entry":[{"changes":[{"value":{},"field":"a"}],"time":17,"id":"W"}],"object":"o"}',
            id="key order as sent",
        ),
    ],
)
def test_split_change_part_of_a_lone_compact_change_is_the_body_itself(body: bytes) -> None:
    """A compact body of one change is its own part, byte for byte, whatever its values."""
    assert [r.body for r in route(body, [_target("split", split="change")])] == [body]


@pytest.mark.parametrize(
    ("body", "parts"),
    [
        pytest.param(
            b'{ "object" : "o" ,\n "entry" : [ {\n  "id" : "W" ,\n  "changes" : [ {"field": "a",\n'
            b'   "value": { "k" : [ 1 , 2 ] } } , {"field":"b","value":{}} ]\n } ]\n}\n',
            [
                b'{"object":"o","entry":[{"id":"W","changes":[{"field": "a",\n'
                b'   "value": { "k" : [ 1 , 2 ] } }]}]}',
                b'{"object":"o","entry":[{"id":"W","changes":[{"field":"b","value":{}}]}]}',
            ],
            id="whitespace inside a change kept, around it dropped",
        ),
        pytest.param(
            rb'{"entry":[{"changes":[{"value":{},"field":"a"}],"time":17,"id":"W"}],"object":"o"}',
            [
                rb'{"entry":[{"changes":[{"value":{},"field":"a"}],"time":17,"id":"W"}],"object":"o"}'
            ],
            id="key order as sent",
        ),
        pytest.param(
            rb'{"object":"o","entry":[{"id":"A","changes":[{"field":"a","value":{}},'
            rb'{"field":"b","value":{}}]},{"id":"B","time":5,"changes":[{"field":"c","value":{}}]}]}',
            [
                rb'{"object":"o","entry":[{"id":"A","changes":[{"field":"a","value":{}}]}]}',
                rb'{"object":"o","entry":[{"id":"A","changes":[{"field":"b","value":{}}]}]}',
                rb'{"object":"o","entry":[{"id":"B","time":5,"changes":[{"field":"c","value":{}}]}]}',
            ],
            id="every change of every entry, with its own entry's id and time",
        ),
        pytest.param(
            rb'{"object":"o","entry":[{"changes":[{"field":"a","value":{}}],"uid":"x"}],"extra":1}',
            [rb'{"object":"o","entry":[{"changes":[{"field":"a","value":{}}]}]}'],
            id="only Meta's keys, none invented",
        ),
        pytest.param(
            rb'{"object":"o","entry":[{"id":"A","id":"B","changes":[{"field":"a","value":{}}]}],'
            rb'"object":"p"}',
            [rb'{"object":"p","entry":[{"id":"B","changes":[{"field":"a","value":{}}]}]}'],
            id="a repeated key: the last value, the first place, as json reads it",
        ),
        pytest.param(
            rb'{"object":"o","entry":[7,{"id":"A","changes":"none"},{"id":"B","changes":[3,'
            rb'{"field":"a","value":{}}]}]}',
            [rb'{"object":"o","entry":[{"id":"B","changes":[{"field":"a","value":{}}]}]}'],
            id="items that are not objects skipped",
        ),
    ],
)
def test_split_change_parts_are_the_original_text_of_each_value(
    body: bytes, parts: list[bytes]
) -> None:
    """Each part is Meta's shape around one change, Meta's keys only, each value's text as sent."""
    assert [r.body for r in route(body, [_target("split", split="change")])] == parts


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        pytest.param({"waba_ids": ("123456789012345678901234567890",)}, 1, id="30-digit entry id"),
        pytest.param({"waba_ids": ("123456789012345678901234567891",)}, 0, id="one digit off"),
        pytest.param(
            {"phone_number_ids": ("98765432109876543210987654321",)}, 1, id="29-digit phone id"
        ),
    ],
)
@pytest.mark.parametrize("split", ["none", "change"])
def test_filters_match_numeric_ids_of_any_width(
    filters: dict[str, Any], expected: int, split: str
) -> None:
    """Ids sent as integers wider than 64 bits match the same digits in a filter, exactly."""
    body = (
        b'{"object":"o","entry":[{"id":123456789012345678901234567890,"changes":[{"field":"f",'
        b'"value":{"metadata":{"phone_number_id":98765432109876543210987654321}}}]}]}'
    )
    assert len(route(body, [_target("t", split=split, **filters)])) == expected


def _parts_expected(body: bytes) -> list[Any]:
    """What each part of ``body`` should read as: built from json's own reading of it."""
    payload = json.loads(body)
    expected = []
    for entry in payload["entry"]:
        for change in entry["changes"]:
            minimal = {k: [change] if k == "changes" else v for k, v in entry.items()}
            expected.append({k: [minimal] if k == "entry" else v for k, v in payload.items()})
    return expected


def _samples() -> list[bytes]:
    return [path.read_bytes() for path in sorted(EXAMPLES.glob("*.json"))]


def _combined(bodies: list[bytes]) -> bytes:
    """One batch of several samples, as Meta batches: every entry of every sample, in order."""
    entries = [entry for body in bodies for entry in json.loads(body)["entry"]]
    return _body({"object": "whatsapp_business_account", "entry": entries})


@pytest.mark.parametrize(
    "body",
    [
        *[
            pytest.param(body, id=path.stem)
            for path, body in zip(sorted(EXAMPLES.glob("*.json")), _samples(), strict=True)
        ],
        pytest.param(_combined(_samples()), id="every sample in one batch"),
    ],
)
def test_split_change_parts_read_as_one_change_each_on_meta_samples(body: bytes) -> None:
    """On Meta's samples, alone and batched, each part reads as the payload of just its change."""
    changes = split_changes(body)
    assert [json.dumps(json.loads(c.part or b"")) for c in changes] == [
        json.dumps(e) for e in _parts_expected(body)
    ]
    assert [(c.entry_id, c.field, c.waba_id, c.phone_number_id) for c in changes] == [
        (c.entry_id, c.field, c.waba_id, c.phone_number_id) for c in iter_changes(json.loads(body))
    ]


_WHITESPACE = ["", " ", "\n", "\t", "\r\n  "]
_STRINGS = ["", "a", "café", "😀", 'q"uote', "back\\slash", "/path/", "<@%>", "\u2028", "\x01"]


def _text(value: Any, rng: random.Random) -> str:
    """``value`` as JSON, with random whitespace and escaping, as any writer may send it."""
    space = rng.choice(_WHITESPACE)
    if isinstance(value, dict):
        members = [
            f"{space}{_text(k, rng)}{space}:{space}{_text(v, rng)}" for k, v in value.items()
        ]
        return "{" + ",".join(members) + space + "}"
    if isinstance(value, list):
        return "[" + ",".join(space + _text(item, rng) for item in value) + space + "]"
    text = json.dumps(value, ensure_ascii=rng.random() < 0.5)
    return text.replace("/", "\\/") if rng.random() < 0.5 else text


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.choice(_STRINGS)
    if kind == 1:
        return rng.choice([0, -1, 2**63, 2**64 + 1, -(10**30), 10**40, 1749416383])
    if kind == 2:
        return rng.choice([1.5, -0.25, 1e300])
    if kind == 3:
        return rng.choice([True, False, None])
    if kind == 4:
        return rng.choice(_STRINGS) + str(rng.randrange(10**25))
    if kind == 5:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(3))]
    return {rng.choice(_STRINGS): _random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def _random_payload(rng: random.Random) -> dict[str, Any]:
    entries = []
    for _ in range(rng.randrange(1, 4)):
        entry: dict[str, Any] = {
            "id": rng.choice(["102290129340398", 10**30, -(2**70)]),
            "time": rng.choice([1751247548, 2**65]),
            "changes": [
                {"value": _random_value(rng), "field": rng.choice(_STRINGS)}
                for _ in range(rng.randrange(1, 4))
            ],
        }
        keys = list(entry)
        rng.shuffle(keys)
        entries.append({k: entry[k] for k in keys if k != "time" or rng.random() < 0.5})
    top = [("object", "whatsapp_business_account"), ("entry", entries)]
    rng.shuffle(top)
    return dict(top)


@pytest.mark.parametrize("seed", range(200))
def test_split_change_parts_hold_exact_values_of_any_writer(seed: int) -> None:
    """Whatever a body's whitespace, escapes, number widths and key order, parts keep each value."""
    rng = random.Random(seed)
    payload = _random_payload(rng)
    body = _text(payload, rng).encode("utf-8", "surrogatepass")
    assert parse(body) == json.loads(body)
    routes = route(body, [_target("split", split="change")])
    assert [json.dumps(json.loads(r.body or b"")) for r in routes] == [
        json.dumps(e) for e in _parts_expected(body)
    ]
    for r in routes:
        # The change's own text is in the part byte for byte.
        assert r.body is not None
        change = json.loads(r.body)["entry"][0]["changes"][0]
        assert json.dumps(change) in [json.dumps(c) for e in payload["entry"] for c in e["changes"]]
