"""What every adversarial case shares: a gateway with one catch-all target, a raw TLS client,
and the check that follows every attack.

Rule: each case asserts the answer it gets, that nothing of the attack reached the target, and
that the gateway still serves a valid notification afterwards (:func:`still_serves`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Unpack

from helpers import (
    ConfigOptions,
    gateway_config,
    message_body,
    meta_signature,
    post,
    sink_target,
)
from pki import Pki
from settling import pending_in_gateway, until_settled
from sink import Sink

from gateway.config import Config
from gateway.runtime.gateway import Gateway

__all__ = ["RawReply", "attack_gateway", "raw_exchange", "still_serves"]


@asynccontextmanager
async def attack_gateway(
    pki: Pki, tmp_path: Path, sink: Sink, **options: Unpack[ConfigOptions]
) -> AsyncIterator[Gateway]:
    """The gateway under attack: defaults, small timeouts, one catch-all target on the sink."""
    config: Config = gateway_config(pki, tmp_path, targets=[sink_target(sink)], **options)
    listen = dataclasses.replace(config.listen, request_timeout_s=1.0, idle_timeout_s=1.0)
    async with Gateway(dataclasses.replace(config, listen=listen)) as gateway:
        yield gateway


@dataclasses.dataclass(frozen=True, slots=True)
class RawReply:
    """The first answer on a raw connection (status 0: none, the connection was closed)."""

    status: int
    body: bytes
    closed: bool


async def raw_exchange(
    gateway: Gateway, context: ssl.SSLContext | None, data: bytes, *, wait_s: float = 3.0
) -> RawReply:
    """Send ``data`` as it is on a new connection (TLS unless ``context`` is None) and read the
    first answer, if any, and whether the gateway then closed the connection."""
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            gateway.port,
            ssl=context,
            server_hostname="localhost" if context is not None else None,
        )
    except (ssl.SSLError, ConnectionError):
        return RawReply(0, b"", True)
    try:
        writer.write(data)
        await writer.drain()
        raw = b""
        closed = False
        try:
            async with asyncio.timeout(wait_s):
                while True:
                    chunk = await reader.read(65536)
                    if not chunk:
                        closed = True
                        break
                    raw += chunk
                    if _complete(raw):
                        break
        except TimeoutError:
            pass
        except (ssl.SSLError, ConnectionError):
            closed = True
        if not raw:
            return RawReply(0, b"", closed)
        head, _, body = raw.partition(b"\r\n\r\n")
        return RawReply(int(head.split()[1]), body, closed)
    finally:
        writer.close()


def _complete(raw: bytes) -> bool:
    head, separator, body = raw.partition(b"\r\n\r\n")
    if not separator:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return True


async def still_serves(
    gateway: Gateway, pki: Pki, sink: Sink, *, forwarded_before: int = 0
) -> None:
    """A valid notification after the attack gets its 200 and is the only new thing the target
    receives (nothing the attacker sent reached it), counted once the outbox has nothing
    pending and the target has been quiet."""
    marker = message_body(f"after the attack {id(gateway)}")
    assert (await post(gateway, pki, marker)).status == 200
    await sink.wait_for(forwarded_before + 1)
    await until_settled(pending_in_gateway(gateway), lambda: len(sink.received))
    assert [r.body for r in sink.received[forwarded_before:]] == [marker]


def signed_post(body: bytes, *, path: str = "/webhook", extra: str = "") -> bytes:
    """A raw HTTP/1.1 POST of ``body`` signed as Meta signs it."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nX-Hub-Signature-256: {meta_signature(body)}\r\n"
        f"{extra}\r\n"
    )
    return head.encode() + body
