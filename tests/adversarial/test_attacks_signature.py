"""Attacks on the signature: forged, stripped, replayed, bent to fit another body."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import APP_SECRET, message_body, meta_signature, post
from pki import Pki
from sink import Sink

from adversarial.attack import attack_gateway, still_serves

BODY = message_body("signature")


@pytest.mark.parametrize(
    ("signature", "body"),
    [
        pytest.param(None, BODY, id="no signature header"),
        pytest.param("", BODY, id="an empty header"),
        pytest.param("sha1=" + "0" * 40, BODY, id="the old sha1 scheme"),
        pytest.param("sha256=" + "0" * 64, BODY, id="zeros"),
        pytest.param(meta_signature(BODY)[:-1], BODY, id="one hex digit short"),
        pytest.param(meta_signature(BODY) + "0", BODY, id="one hex digit more"),
        pytest.param(meta_signature(BODY, "another-secret"), BODY, id="another app's secret"),
        pytest.param(meta_signature(BODY), BODY + b"\n", id="the body with a newline added"),
        pytest.param(meta_signature(BODY), BODY.replace(b'"text"', b'"text" '), id="re-spaced"),
        pytest.param(
            meta_signature(BODY, APP_SECRET + " "), BODY, id="the secret with a trailing space"
        ),
    ],
)
async def test_a_forged_or_bent_signature_is_401_and_reaches_nothing(
    pki: Pki, tmp_path: Path, sink: Sink, signature: str | None, body: bytes
) -> None:
    """Every forged, stripped or bent signature is 401; nothing is stored or forwarded."""
    async with attack_gateway(pki, tmp_path, sink) as gateway:
        answer = await post(
            gateway,
            pki,
            body,
            secret=None if signature is None else APP_SECRET,
            signature=signature,
        )
        assert answer.status == 401
        assert (await gateway.outbox.counts()) == {"pending": 0, "delivered": 0, "dead": 0}
        await still_serves(gateway, pki, sink)


async def test_a_replayed_notification_is_acknowledged_and_forwarded_once(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """Meta's signature carries no timestamp: a replay inside the deduplication window is
    answered 200 (so a genuine retry stops) but forwarded only once."""
    async with attack_gateway(pki, tmp_path, sink) as gateway:
        for _ in range(3):
            assert (await post(gateway, pki, BODY)).status == 200
        (received,) = await sink.wait_for(1)
        assert received.body == BODY
        await still_serves(gateway, pki, sink, forwarded_before=1)
