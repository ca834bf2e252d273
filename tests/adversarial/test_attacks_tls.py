"""Attacks on the TLS layer: who may complete a handshake and be heard at all."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import message_body
from pki import ClientKind, Pki
from sink import Sink

from adversarial.attack import attack_gateway, raw_exchange, signed_post, still_serves


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        pytest.param("none", 0, id="no client certificate: handshake refused"),
        pytest.param("impostor", 0, id="a look-alike CA with Meta's CN: handshake refused"),
        pytest.param("expired", 0, id="Meta's CA, expired: handshake refused"),
        pytest.param("leaf_only", 0, id="Meta's leaf without its intermediate: refused"),
        pytest.param("wrong_cn", 403, id="Meta's CA, another CN: 403"),
    ],
)
async def test_a_client_that_is_not_meta_is_never_heard(
    pki: Pki, tmp_path: Path, sink: Sink, kind: ClientKind, status: int
) -> None:
    """A signed notification from anyone but Meta's exact client gets no 200 and never
    reaches a target; the gateway keeps serving Meta."""
    async with attack_gateway(pki, tmp_path, sink) as gateway:
        reply = await raw_exchange(
            gateway, pki.client_context(kind), signed_post(message_body(f"as {kind}"))
        )
        assert reply.status == status
        await still_serves(gateway, pki, sink)


async def test_plain_http_on_the_tls_port_is_dropped(pki: Pki, tmp_path: Path, sink: Sink) -> None:
    """Plain HTTP to the TLS port gets no HTTP answer and reaches nothing."""
    async with attack_gateway(pki, tmp_path, sink) as gateway:
        reply = await raw_exchange(gateway, None, signed_post(message_body("plain")))
        assert reply.status == 0
        assert reply.closed
        await still_serves(gateway, pki, sink)


async def test_garbage_instead_of_a_client_hello_is_dropped(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """Random bytes where a TLS ClientHello belongs: the connection is closed, nothing else."""
    async with attack_gateway(pki, tmp_path, sink) as gateway:
        reply = await raw_exchange(gateway, None, bytes(range(256)) * 8)
        assert (reply.status, reply.closed) == (0, True)
        await still_serves(gateway, pki, sink)
