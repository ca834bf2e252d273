"""The quick JSON check of the ack path (gateway.edge.jsontext.surely_json): it only ever says
"surely JSON" of a body the gateway's parsers accept, so routing accepts and refuses exactly the
bodies it did when every body was parsed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import TargetConfig
from gateway.edge.jsontext import surely_json
from gateway.edge.routing import parse, route
from gateway.errors import BadRequest, NestedTooDeep
from gateway.outbox import Route

# Meta's published samples, byte for byte as Meta publishes them.
EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.json"))
CATCH_ALL = [TargetConfig(name="all", url="http://127.0.0.1/all")]
SPLIT = [TargetConfig(name="split", url="http://127.0.0.1/s", split="change")]


def _parsers_accept(body: bytes) -> bool:
    """What the gateway's parsers decide (orjson, then json), as routing decided for every body
    before the quick check: valid JSON too deep to read counts as accepted (catch-all)."""
    try:
        parse(body, exact=False)
    except NestedTooDeep:
        return True
    except BadRequest:
        return False
    return True


def _routing_accepts(body: bytes, targets: list[TargetConfig]) -> bool:
    try:
        route(body, targets)
    except BadRequest:
        return False
    return True


@pytest.mark.parametrize(
    ("body", "surely"),
    [
        pytest.param(b'{"object":"whatsapp_business_account"}', True, id="plain"),
        pytest.param(b'\t{ "a" : [ 1 , -0.5e+3 ] }\r\n', True, id="JSON whitespace"),
        pytest.param(b'"\\ud83d\\ude00 \\u00e9 \\/ \\" \\\\ \\b\\f\\n\\r\\t"', True, id="escapes"),
        pytest.param('{"t":"caf\u00e9 \U0001f600"}'.encode(), True, id="raw UTF-8"),
        pytest.param(b'{"n":123456789012345678901234567890}', True, id="wide integer"),
        pytest.param(b"9" * 5000, True, id="beyond int's digit limit"),
        pytest.param(b"1e999", True, id="beyond a double"),
        pytest.param(b'{"a":1,"a":2}', True, id="duplicate keys"),
        pytest.param(b"null", True, id="top-level scalar"),
        # Not surely JSON: the parsers decide, and accept these.
        pytest.param(b'\xef\xbb\xbf{"a":1}', False, id="byte order mark"),
        pytest.param(b'{"a":NaN}', False, id="NaN"),
        pytest.param(b'{"t":"\\ud800"}', False, id="lone surrogate escape"),
        pytest.param(b'{"t":"\\ude00\\ud83d"}', False, id="surrogates reversed"),
        pytest.param(b'{"t":"\xed\xa0\x80"}', False, id="encoded surrogate"),
        pytest.param(b"[" * 5000 + b"]" * 5000, False, id="deeper than msgspec reads"),
        # Not JSON at all: refused by the parsers too.
        pytest.param(b'{"t":"\xff"}', False, id="not UTF-8"),
        pytest.param(b'{"t":"\xc0\x80"}', False, id="overlong UTF-8"),
        pytest.param(b'{"t":"\xf4\x90\x80\x80"}', False, id="beyond U+10FFFF"),
        pytest.param(b'{"t":"\x01"}', False, id="raw control character"),
        pytest.param(b'{"t":"\\x41"}', False, id="unknown escape"),
        pytest.param(b'{"t":"\\u12G4"}', False, id="bad unicode escape"),
        pytest.param(b'{"a":1,}', False, id="trailing comma"),
        pytest.param(b'{"a" 1}', False, id="missing colon"),
        pytest.param(b"{1:2}", False, id="key not a string"),
        pytest.param(b"[1 2]", False, id="missing comma"),
        pytest.param(b"-01", False, id="leading zero"),
        pytest.param(b"1.", False, id="fraction without digits"),
        pytest.param(b"+1", False, id="plus sign"),
        pytest.param(b"0x10", False, id="hexadecimal"),
        pytest.param(b'{"a":tru}', False, id="truncated literal"),
        pytest.param(b'{"a":1} x', False, id="text after the value"),
        pytest.param(b'{"a":1}\x00', False, id="NUL after the value"),
        pytest.param(b"\x0b{}", False, id="vertical tab is not JSON whitespace"),
        pytest.param("\u00a0{}".encode(), False, id="no-break space is not JSON whitespace"),
        pytest.param(b"", False, id="empty"),
        pytest.param(b"  ", False, id="whitespace only"),
        pytest.param(b"[" * 5000 + b"]" * 4999, False, id="deep and one bracket short"),
    ],
)
def test_surely_json_is_said_only_of_what_the_parsers_accept(body: bytes, surely: bool) -> None:
    """Each edge case: the quick verdict, never "surely" where the parsers refuse, and routing's
    decision the parsers' own."""
    assert surely_json(body) is surely
    if surely:
        assert _parsers_accept(body)
    assert _routing_accepts(body, CATCH_ALL) is _parsers_accept(body)
    assert _routing_accepts(body, SPLIT) is _parsers_accept(body)


def _escaped(body: bytes) -> list[bytes]:
    """``body`` with a string of Meta's escapes added, both as Meta sends it (non-ASCII escaped,
    ``\\/``) and as raw UTF-8."""
    text = 'caf\u00e9 \U0001f600 a/b "q" \\ \u2028'
    payload = json.loads(body)
    payload["note"] = text
    ascii_ = json.dumps(payload, ensure_ascii=True, separators=(",", ":")).replace("/", "\\/")
    return [ascii_.encode(), json.dumps(payload, ensure_ascii=False, indent=2).encode()]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.stem)
def test_every_meta_sample_is_surely_json(example: Path) -> None:
    """Meta's samples, as published and with Meta's escaping, take the quick path."""
    body = example.read_bytes()
    for variant in [body, *_escaped(body)]:
        assert surely_json(variant)
        assert json.loads(variant) is not None  # and json reads them as well


_TOKENS = st.sampled_from(
    [
        b"{",
        b"}",
        b"[",
        b"]",
        b",",
        b":",
        b'"',
        b"\\",
        b"u",
        b"d83d",
        b"00e9",
        b"ud800",
        b"a",
        b"1",
        b"0",
        b"-",
        b".",
        b"e",
        b"+",
        b"true",
        b"null",
        b"NaN",
        b" ",
        b"\t",
        b"\n",
        b"\x0b",
        b"\x00",
        b"\x1f",
        b"\xc3\xa9",
        b"\xe9",
        b"\xed\xa0\x80",
        b"\xf0\x9f\x98\x80",
        b"\xef\xbb\xbf",
        b'"k"',
        b'"\\/"',
        b"12345678901234567890",
    ]
)


@st.composite
def _near_json(draw: st.DrawFn) -> bytes:
    """Valid JSON from hypothesis, then cut, patched or spliced with JSON's hard bytes."""
    value = draw(
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
            lambda inner: (
                st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4)
            ),
            max_leaves=12,
        )
    )
    body = json.dumps(value, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(body)))
        cut = draw(st.integers(0, 2))
        body = body[:at] + draw(_TOKENS) + body[at + cut :]
    return body


@settings(max_examples=1000, deadline=None)
@given(body=_near_json() | st.lists(_TOKENS, max_size=12).map(b"".join) | st.binary(max_size=40))
def test_generated_bodies_are_surely_json_only_when_the_parsers_accept_them(body: bytes) -> None:
    """Whatever the body, "surely JSON" implies the parsers accept it, so routing (catch-all or
    split) accepts and refuses exactly what the parsers do."""
    if surely_json(body):
        assert _parsers_accept(body)
    assert _routing_accepts(body, CATCH_ALL) is _parsers_accept(body)
    assert _routing_accepts(body, SPLIT) is _parsers_accept(body)


def test_a_catch_all_route_of_a_sample_is_every_target_unread() -> None:
    """The quick path still routes: every catch-all target gets the body as sent."""
    body = EXAMPLES[0].read_bytes()
    assert route(body, CATCH_ALL) == [Route("all", None)]
