"""One view of what a target of each kind received, so a behaviour test runs for every kind.

Rule: each destination is real: the HTTP sink, a Redis server read back with ``XRANGE``, a NATS
server read back from its JetStream stream. What a broker holds is shown as the sink shows a
request: ``headers`` are the entry's fields (the message's headers) other than the body, so one
assertion checks every kind. ``down()`` and ``up()`` stop and restart the target's server.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from typing import Any, Protocol, Unpack

import nats
import nats.aio.client
import nats.js.errors
import redis.asyncio as aioredis
from brokers import BrokerServer
from helpers import TargetOptions, quick, sink_target
from multidict import CIMultiDict, CIMultiDictProxy
from sink import DEADLINE_S, Received, Sink

from gateway.config import TargetConfig, TargetKind

__all__ = [
    "KINDS",
    "STREAM",
    "Destination",
    "HttpDestination",
    "NatsDestination",
    "RedisDestination",
    "entry_received",
]

KINDS: tuple[TargetKind, ...] = ("http", "redis", "nats")
# The JetStream stream the NATS tests publish to: it captures every subject under "waba.".
STREAM = "WABA"


class Destination(Protocol):
    kind: TargetKind

    def target(self, name: str, **options: Unpack[TargetOptions]) -> TargetConfig:
        """A target of this kind named ``name``, its own path, stream or subject."""
        ...

    async def received(self, name: str) -> list[Received]:
        """What target ``name`` has received, oldest first."""
        ...

    async def down(self) -> None: ...

    async def up(self) -> None: ...


async def wait_for(destination: Destination, count: int, name: str) -> list[Received]:
    """At least ``count`` deliveries at target ``name``, as soon as they are there."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        found = await destination.received(name)
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} received {len(found)}, expected {count}")
        await asyncio.sleep(0.02)


def _received(name: str, headers: dict[str, str], body: bytes) -> Received:
    return Received(f"/{name}", CIMultiDictProxy(CIMultiDict(headers)), body, time.monotonic())


def entry_received(name: str, fields: Mapping[Any, Any] | None) -> Received:
    """A Redis stream entry (bytes keys and values) as the sink would show it."""
    assert fields is not None
    headers = {bytes(k).decode(): bytes(v).decode() for k, v in fields.items() if k != b"body"}
    return _received(name, headers, bytes(fields[b"body"]))


class HttpDestination:
    kind: TargetKind = "http"

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    def target(self, name: str, **options: Unpack[TargetOptions]) -> TargetConfig:
        return sink_target(self.sink, name, **options)

    async def received(self, name: str) -> list[Received]:
        return self.sink.at(f"/{name}")

    async def down(self) -> None:
        await self.sink.down()

    async def up(self) -> None:
        await self.sink.up()


class RedisDestination:
    kind: TargetKind = "redis"

    def __init__(self, server: BrokerServer) -> None:
        self.server = server

    def target(self, name: str, **options: Unpack[TargetOptions]) -> TargetConfig:
        settings = quick(kind="redis", url=self.server.url, stream=f"stream:{name}")
        settings.update(options)
        return TargetConfig(name=name, **settings)

    async def received(self, name: str) -> list[Received]:
        client = aioredis.Redis.from_url(self.server.url)
        try:
            entries = await client.xrange(f"stream:{name}")
        finally:
            await client.aclose()
        return [entry_received(name, fields) for _, fields in entries or []]

    async def flush(self) -> None:
        client = aioredis.Redis.from_url(self.server.url)
        try:
            await client.flushall()
        finally:
            await client.aclose()

    async def down(self) -> None:
        await asyncio.to_thread(self.server.down)

    async def up(self) -> None:
        await asyncio.to_thread(self.server.up)


class NatsDestination:
    kind: TargetKind = "nats"

    def __init__(self, server: BrokerServer) -> None:
        self.server = server

    def target(self, name: str, **options: Unpack[TargetOptions]) -> TargetConfig:
        settings = quick(kind="nats", url=self.server.url, subject=f"waba.{name}")
        settings.update(options)
        return TargetConfig(name=name, **settings)

    async def received(self, name: str) -> list[Received]:
        client = await self._connect()
        try:
            js = client.jetstream(timeout=DEADLINE_S)
            info = await js.stream_info(STREAM)
            found = []
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                try:
                    message = await js.get_msg(STREAM, seq)
                except nats.js.errors.NotFoundError:
                    continue
                if message.subject == f"waba.{name}":
                    found.append(_received(name, dict(message.headers or {}), message.data or b""))
            return found
        finally:
            await client.close()

    async def reset(self) -> None:
        """An empty stream capturing ``waba.>``."""
        client = await self._connect()
        try:
            js = client.jetstream(timeout=DEADLINE_S)
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(STREAM)
            await js.add_stream(name=STREAM, subjects=["waba.>"])
        finally:
            await client.close()

    async def _connect(self) -> nats.aio.client.Client:
        # nats-py's own limits (2 s to connect, 5 s a JetStream request: the ``jetstream()``
        # above) are for a quiet machine; a loaded test machine can take longer, and these
        # waits end as soon as the server answers.
        return await nats.connect(self.server.url, connect_timeout=int(DEADLINE_S))

    async def down(self) -> None:
        await asyncio.to_thread(self.server.down)

    async def up(self) -> None:
        await asyncio.to_thread(self.server.up)
