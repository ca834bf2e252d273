"""Attacks on HTTP framing: smuggling, oversized parts, versions, pipelining with garbage."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import message_body, meta_signature
from pki import Pki
from sink import Sink

from adversarial.attack import attack_gateway, raw_exchange, signed_post, still_serves

BODY = message_body("framing")
SIGNATURE = meta_signature(BODY)


def _head(lines: str) -> bytes:
    return ("POST /webhook HTTP/1.1\r\nHost: localhost\r\n" + lines + "\r\n").encode()


@pytest.mark.parametrize(
    ("data", "status"),
    [
        pytest.param(
            _head(
                f"Content-Length: {len(BODY)}\r\nTransfer-Encoding: chunked\r\n"
                f"X-Hub-Signature-256: {SIGNATURE}\r\n"
            )
            + b"0\r\n\r\n"
            + BODY,
            400,
            id="Content-Length and Transfer-Encoding together (RFC 9112 6.1)",
        ),
        pytest.param(
            _head(
                f"Content-Length: {len(BODY)}\r\nContent-Length: {len(BODY) + 1}\r\n"
                f"X-Hub-Signature-256: {SIGNATURE}\r\n"
            )
            + BODY,
            400,
            id="two different Content-Lengths",
        ),
        pytest.param(
            _head(f"Content-Length: {len(BODY)}\r\nX-Hub-Signature-256:\r\n {SIGNATURE}\r\n")
            + BODY,
            400,
            id="a folded header line (obs-fold, RFC 9112 5.2)",
        ),
        pytest.param(
            _head(f"Content-Length: {len(BODY)}\r\nX-Hub Signature: x\r\n") + BODY,
            400,
            id="a space in a header name",
        ),
        pytest.param(
            _head("X-Pad: " + "a" * (70 * 1024) + "\r\n"),
            431,
            id="a head over 64 KiB",
        ),
        pytest.param(
            ("GET /webhook?" + "a" * (9 * 1024) + " HTTP/1.1\r\nHost: x\r\n\r\n").encode(),
            414,
            id="a URL over 8 KiB",
        ),
        pytest.param(
            signed_post(BODY).replace(b"HTTP/1.1", b"HTTP/2.0", 1),
            505,
            id="HTTP/2.0 in a request line",
        ),
        pytest.param(
            _head(f"Transfer-Encoding: gzip, chunked\r\nX-Hub-Signature-256: {SIGNATURE}\r\n")
            + b"0\r\n\r\n",
            501,
            id="a transfer coding other than chunked (RFC 9112 6.1)",
        ),
        pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400, id="binary garbage"),
    ],
)
async def test_malformed_framing_is_refused_and_reaches_nothing(
    pki: Pki, tmp_path: Path, sink: Sink, data: bytes, status: int
) -> None:
    """Each framing trick gets its refusal, nothing is stored or forwarded, and the gateway
    goes on serving."""
    async with attack_gateway(pki, tmp_path, sink) as gateway:
        reply = await raw_exchange(gateway, pki.client_context("meta"), data)
        assert reply.status == status
        await still_serves(gateway, pki, sink)


async def test_a_valid_request_followed_by_garbage_forwards_only_the_valid_one(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """Pipelined: the valid notification is answered and forwarded; the garbage after it is
    refused and smuggles nothing to the target."""
    async with attack_gateway(pki, tmp_path, sink) as gateway:
        smuggled = message_body("smuggled")
        data = signed_post(BODY) + b"GARBAGE / HTTP/1.1\r\n\r\n" + signed_post(smuggled)
        reply = await raw_exchange(gateway, pki.client_context("meta"), data)
        assert reply.status == 200
        (received,) = await sink.wait_for(1)
        assert received.body == BODY
        await still_serves(gateway, pki, sink, forwarded_before=1)
        assert smuggled not in [r.body for r in sink.received]
