"""``kind = "redis"``: each delivery is one ``XADD`` entry on the target's stream.

The entry's field ``body`` holds the exact bytes an HTTP target would receive, and its other
fields the headers an HTTP target would get, under the same names
(:mod:`gateway.delivery.headers`: all but ``Content-Type`` and ``User-Agent``), so a consumer
checks the same signature. A delivery is done only once ``XADD`` has returned its entry
id. Redis has no idempotent add in the versions deployed today, so a crash between that reply and
the outbox recording it adds the entry again on the next attempt: consumers deduplicate on
``X-Gateway-Delivery-Id`` (at-least-once, as for HTTP). The deliveries of a batch go in one
pipeline (one round trip), each with its own reply.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from gateway.config import TargetConfig
from gateway.delivery.headers import delivery_headers
from gateway.errors import TargetError, TargetUnreachable
from gateway.outbox import Delivery
from gateway.outbox.model import AttemptResult

__all__ = ["RedisStreamSender", "result_of"]

# Replies that will not change however often the entry is added again.
_PERMANENT = ("WRONGTYPE", "ERR Protocol error", "ERR string exceeds maximum allowed size")


def result_of(reply: object, stream: str) -> AttemptResult:
    """One pipeline reply to ``XADD`` as an attempt's result."""
    if isinstance(reply, bytes | str):
        entry = reply.decode() if isinstance(reply, bytes) else reply
        return AttemptResult(accepted=True, response_excerpt=f"stream {stream} entry {entry}")
    if isinstance(reply, ResponseError):
        text = str(reply)[:300]
        permanent = text.startswith(_PERMANENT)
        return AttemptResult(error=f"redis: {text}", permanent=permanent)
    if isinstance(reply, BaseException):
        return AttemptResult(error=f"redis: {type(reply).__name__}: {reply}"[:300])
    return AttemptResult(error=f"redis: unexpected reply {reply!r}"[:300])


class RedisStreamSender:
    """Adds deliveries to one Redis stream over redis-py's asyncio connection pool."""

    def __init__(self, target: TargetConfig) -> None:
        assert target.stream is not None  # load_config requires it with kind = "redis"
        self.target = target
        self._stream = target.stream
        trim = () if target.maxlen is None else (b"MAXLEN", b"~", b"%d" % target.maxlen)
        self._head = (b"XADD", target.stream.encode(), *trim, b"*")
        self._client = aioredis.Redis.from_url(
            target.url,
            # No socket_timeout: it would arm a timer for every reply read; one deadline per
            # batch (send_many) bounds the exchange instead.
            # No max_connections: the dispatcher bounds the batches in flight (one connection
            # each); a pool cap would fail a batch at the cap instead of waiting.
            socket_connect_timeout=target.timeout_s,
        )

    async def send_many(
        self,
        deliveries: Sequence[Delivery],
        attempts: Sequence[int],
        trace_headers: Sequence[Mapping[str, str]] | None = None,
    ) -> list[AttemptResult]:
        now = time.time()
        traces = trace_headers or [{}] * len(deliveries)
        commands = [
            _command(
                [
                    *self._head,
                    b"body",
                    delivery.body,
                    *_flat(delivery_headers(delivery, self.target, attempt, now) | dict(trace)),
                ]
            )
            for delivery, attempt, trace in zip(deliveries, attempts, traces, strict=True)
        ]
        try:
            async with asyncio.timeout(self.target.timeout_s):
                replies = await self._exchange(commands)
        except TimeoutError:
            failed = AttemptResult(error=f"redis: timed out after {self.target.timeout_s:g}s")
            return [failed] * len(deliveries)
        except (RedisError, OSError) as exc:
            failed = AttemptResult(error=f"redis: {type(exc).__name__}: {exc}"[:300])
            return [failed] * len(deliveries)
        return [result_of(reply, self._stream) for reply in replies]

    async def _exchange(self, commands: list[bytes]) -> list[object]:
        """Write every command at once on one pooled connection, then read a reply for each
        (a pipeline, as redis-py's own, but packed here once: its Pipeline re-encodes every
        argument in Python, which cost more CPU per delivery than the whole HTTP path)."""
        pool = self._client.connection_pool
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await connection.send_packed_command(b"".join(commands))
            replies: list[object] = []
            for _ in commands:
                try:
                    replies.append(await connection.read_response())
                except ResponseError as exc:  # this entry's error reply; the others go on
                    replies.append(exc)
        except BaseException:
            # Cut off mid-exchange (timeout, reset): unread replies would confuse the next user.
            await connection.disconnect()
            raise
        finally:
            await pool.release(connection)
        return replies

    async def warm(self) -> None:
        try:
            async with asyncio.timeout(self.target.timeout_s):
                await self._client.ping()
        except (RedisError, OSError, TimeoutError):
            pass  # down now: the deliveries wait and are retried

    async def probe(self) -> str:
        where = f"target {self.target.name!r}: redis {_host(self.target.url)}"
        try:
            async with asyncio.timeout(self.target.timeout_s):
                kind = await self._client.type(self._stream)
                length = await self._client.xlen(self._stream) if kind == b"stream" else 0
        except TimeoutError as exc:
            raise TargetUnreachable(
                f"{where}: no answer within {self.target.timeout_s:g}s"
            ) from exc
        except (RedisError, OSError) as exc:
            raise TargetUnreachable(f"{where}: {exc}") from exc
        if kind not in (b"none", b"stream"):
            shown = kind.decode() if isinstance(kind, bytes) else kind
            raise TargetError(f"{where}: key {self._stream!r} holds a {shown}, not a stream")
        return f"{where} reachable, stream {self._stream!r} has {length} entries"

    async def close(self) -> None:
        await self._client.aclose()


def _flat(headers: dict[str, str]) -> list[bytes]:
    return [part.encode() for pair in headers.items() for part in pair]


def _command(args: list[bytes]) -> bytes:
    """One command in RESP, the protocol's array of bulk strings."""
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def _host(url: str) -> str:
    """Host and port of ``url``, never its password."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 6379}"
