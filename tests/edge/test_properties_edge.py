"""Property-based tests of the edge: the HTTP listener over arbitrary splits, and the router.

The listener must give each request its own answer however the network cuts the bytes into
reads; the router must route any JSON document without crashing and cut exact parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import ssl
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from helpers import VERIFY_TOKEN, gateway_config, message_body, meta_signature
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pki import Pki

from gateway.config import TargetConfig
from gateway.edge.routing import iter_changes, parse, route
from gateway.errors import BadRequest
from gateway.runtime.gateway import Gateway

# -- the listener: one read or many, the same answers -------------------------------------------

# Each kind of request and the answer it gets, whatever came before it on the connection.
EXPECTED = {
    "post": (b"200", b"ok\n"),
    "bad_signature": (b"401", b"X-Hub-Signature-256 does not match the body\n"),
    "bad_json": (b"400", b"body is not valid JSON\n"),
    "handshake": (b"200", b"77"),
    "wrong_token": (b"403", b"hub.verify_token does not match\n"),
    "not_found": (b"404", b"no such path: '/elsewhere'\n"),
}
KINDS = tuple(EXPECTED)


def _request(kind: str, run: str, index: int) -> bytes:
    if kind in ("handshake", "wrong_token", "not_found"):
        token = VERIFY_TOKEN if kind == "handshake" else "wrong"
        query = urlencode(
            {"hub.mode": "subscribe", "hub.challenge": "77", "hub.verify_token": token}
        )
        path = "/webhook" if kind != "not_found" else "/elsewhere"
        return f"GET {path}?{query} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
    body = b"{not json" if kind == "bad_json" else message_body(f"{run}-{index}")
    signature = meta_signature(body, "wrong") if kind == "bad_signature" else meta_signature(body)
    head = (
        f"POST /webhook HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nX-Hub-Signature-256: {signature}\r\n\r\n"
    )
    return head.encode() + body


async def _answers(
    port: int, context: ssl.SSLContext, pieces: list[bytes], count: int
) -> list[Any]:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="localhost"
    )
    try:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.002)  # a separate read on the other side, most of the time
        answers: list[Any] = []
        async with asyncio.timeout(10):
            while len(answers) < count:
                line = await reader.readline()
                if not line:
                    break  # closed early: fewer answers than expected
                headers = {}
                while (header := await reader.readline()) != b"\r\n":
                    name, _, value = header.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                answers.append((line.split(b" ", 2)[1], body))
        return answers
    finally:
        writer.close()


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


async def _compare(pki: Pki, folder: Path, kinds: list[str], cuts: list[int]) -> None:
    config = gateway_config(pki, folder, admin=False)
    context = pki.client_context("meta")
    async with Gateway(config) as gateway:
        whole = b"".join(_request(kind, "one", i) for i, kind in enumerate(kinds))
        split = b"".join(_request(kind, "many", i) for i, kind in enumerate(kinds))
        at_once = await _answers(gateway.port, context, [whole], len(kinds))
        in_pieces = await _answers(gateway.port, context, _cut(split, cuts), len(kinds))
    expected = [EXPECTED[kind] for kind in kinds]
    assert at_once == expected
    assert in_pieces == expected


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=5),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
)
def test_any_split_of_a_request_stream_gets_the_answers_of_one_read(
    pki: Pki, kinds: list[str], cuts: list[int]
) -> None:
    """The same requests sent in one write and cut into arbitrary pieces each get the answer
    their kind always gets, in the order sent."""
    with tempfile.TemporaryDirectory() as folder:
        asyncio.run(_compare(pki, Path(folder), kinds, cuts))


# -- the router: any JSON document routes without crashing, with exact parts --------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
_change = st.fixed_dictionaries(
    {"field": st.sampled_from(["messages", "statuses", 7, None])},
    optional={
        "value": st.one_of(
            _json,
            st.fixed_dictionaries(
                {
                    "metadata": st.fixed_dictionaries(
                        {"phone_number_id": st.sampled_from(["P1", "P2", 3])}
                    )
                }
            ),
        )
    },
)
_entry = st.fixed_dictionaries(
    {"changes": st.one_of(st.lists(st.one_of(_change, _json), max_size=3), _json)},
    optional={"id": st.sampled_from(["W1", "W2", 12, None]), "time": st.integers(0, 2**70)},
)
_payload = st.one_of(
    _json,
    st.fixed_dictionaries(
        {
            "object": st.just("whatsapp_business_account"),
            "entry": st.one_of(st.lists(st.one_of(_entry, _json), max_size=3), _json),
        }
    ),
)
TARGETS = [
    TargetConfig(name="all", url="http://127.0.0.1/all"),
    TargetConfig(name="messages", url="http://127.0.0.1/m", fields=("messages",)),
    TargetConfig(name="w1", url="http://127.0.0.1/w", waba_ids=("W1",)),
    TargetConfig(name="split", url="http://127.0.0.1/s", split="change"),
    TargetConfig(
        name="p1-split", url="http://127.0.0.1/p", split="change", phone_number_ids=("P1",)
    ),
]


@settings(max_examples=300, deadline=None)
@given(payload=_payload, indent=st.sampled_from([None, 0, 2]))
def test_any_json_document_routes_without_crashing_and_parts_are_exact(
    payload: Any, indent: int | None
) -> None:
    """Whatever the document, routing returns routes (never an unexpected error); the catch-all
    target always gets it as sent; each split part is a payload of one entry and one change,
    and there are as many parts as changes."""
    body = json.dumps(payload, indent=indent).encode()
    routes = route(body, TARGETS)
    assert routes[0].target == "all"
    assert routes[0].body is None
    parts = [r.body for r in routes if r.target == "split"]
    changes = list(iter_changes(parse(body)))
    assert len(parts) == len(changes)
    for part in parts:
        assert part is not None
        document = json.loads(part)
        (entry,) = document["entry"]
        (change,) = entry["changes"]
        assert change in [
            c
            for e in payload["entry"]
            if isinstance(e, dict) and isinstance(e.get("changes"), list)
            for c in e["changes"]
        ]


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=200))
def test_any_bytes_route_or_are_refused_with_400(body: bytes) -> None:
    """Arbitrary bytes are either routed or refused with BadRequest (400), nothing else."""
    with contextlib.suppress(BadRequest):
        route(body, TARGETS)
