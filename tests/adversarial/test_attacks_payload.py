"""Attacks through the payload of a validly signed body: size, depth, numbers, encodings."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import post
from pki import Pki
from sink import Sink

from adversarial.attack import attack_gateway, still_serves

DEEP_VALID = b"[" * 5000 + b"]" * 5000
WIDE_NUMBER = (
    b'{"object":"whatsapp_business_account","entry":[{"id":"1","changes":[{"field":"messages",'
    b'"value":{"n":' + b"9" * 5000 + b"}}]}]}"
)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(DEEP_VALID, id="valid JSON nested 5,000 deep"),
        pytest.param(WIDE_NUMBER, id="a 5,000-digit integer"),
        pytest.param(b'{"a":"\\ud800"}', id="a lone surrogate escape"),
        pytest.param(b'{"a":1,"a":2}', id="a repeated key"),
    ],
)
async def test_valid_json_meta_signed_is_kept_and_forwarded_as_sent(
    pki: Pki, tmp_path: Path, sink: Sink, body: bytes
) -> None:
    """Strange but valid JSON that Meta signed is never refused: 200, and the catch-all target
    receives it byte for byte."""
    async with attack_gateway(pki, tmp_path, sink) as gateway:
        assert (await post(gateway, pki, body)).status == 200
        (received,) = await sink.wait_for(1)
        assert received.body == body
        await still_serves(gateway, pki, sink, forwarded_before=1)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        pytest.param(b"[" * 5000 + b"]" * 4999, 400, id="nested 5,000 deep, one bracket short"),
        pytest.param(b'{"a":"\xff\xfe"}', 400, id="invalid UTF-8"),
        pytest.param(b"", 400, id="an empty body"),
        pytest.param(b"{}" * 10, 400, id="two documents"),
        pytest.param(b'{"pad":"' + b"x" * (4 * 1024 * 1024) + b'"}', 413, id="over 4 MiB"),
    ],
)
async def test_a_signed_body_that_is_not_acceptable_is_refused_and_reaches_nothing(
    pki: Pki, tmp_path: Path, sink: Sink, body: bytes, status: int
) -> None:
    """Signed but not one JSON document, or too large: refused, nothing stored or forwarded."""
    async with attack_gateway(pki, tmp_path, sink) as gateway:
        assert (await post(gateway, pki, body)).status == status
        assert (await gateway.outbox.counts()) == {"pending": 0, "delivered": 0, "dead": 0}
        await still_serves(gateway, pki, sink)
