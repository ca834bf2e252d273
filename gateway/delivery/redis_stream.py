"""``kind = "redis"``: each delivery is one ``XADD`` entry on the target's stream.

The entry's field ``body`` holds the exact bytes an HTTP target would receive, and its other
fields the headers an HTTP target would get, under the same names
(:mod:`gateway.delivery.headers`: all but ``Content-Type`` and ``User-Agent``), so a consumer
checks the same signature. A delivery is done only once ``XADD`` has returned its entry
id. Redis has no idempotent add in the versions deployed today, so a crash between that reply and
the outbox recording it adds the entry again on the next attempt: consumers deduplicate on
``X-Gateway-Delivery-Id`` (at-least-once, as for HTTP).

The deliveries of a batch go in one pipeline (one write, one round trip), each with its own
reply. redis-py keeps what a driver is for: the URL, the pool, connecting, ``AUTH`` and
``SELECT``, TLS, and its errors. The hot part is done here instead, on the pooled connection:
the batch's ``XADD`` commands formatted from one template per set of field names, written at
once, and the replies parsed by a hiredis reader from the bytes as they arrive, all of a read at
a time. redis-py packs every argument in Python and reads one reply per call through several
layers of coroutines, which cost more CPU per delivery than the whole HTTP target's path.

A ``rediss://`` target with its own ``ca_file`` or ``cert_file`` is connected to with the context
built from them (:mod:`gateway.delivery.target_tls`), given to asyncio as it is: redis-py's own
TLS options would build another from file names, on top of the system's trust store.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection, Connection
from redis.exceptions import ConnectionError, InvalidResponse, RedisError, ResponseError

from gateway.config import TargetConfig
from gateway.config.rules import redis_url_refusal
from gateway.delivery.answers import kept_words
from gateway.delivery.headers import delivery_headers
from gateway.errors import TargetError, TargetUnreachable
from gateway.outbox import Delivery
from gateway.outbox.model import AttemptResult

__all__ = ["RedisStreamSender", "read_replies", "result_of", "xadd_commands"]

# Replies that will not change however often the entry is added again.
_PERMANENT = ("WRONGTYPE", "ERR Protocol error", "ERR string exceeds maximum allowed size")
# Where Redis starts quoting a command's arguments in an error (see result_of).
_ARGS_QUOTED = ", with args beginning with:"
# What one read of the connection takes at most: a batch's replies are ~20 bytes each.
_READ_BYTES = 64 * 1024
_MORE = object()  # the reader's answer while a reply is incomplete
# The fields' part of an XADD for each set of field names met so far (signature modes, traced
# or not): a format with the names in it, so an entry's fields are one formatting of its values.
_FIELDS: dict[tuple[str, ...], bytes] = {}


def result_of(reply: object, stream: str, body: bytes) -> AttemptResult:
    """One pipeline reply to ``XADD`` of ``body`` as an attempt's result. An entry id is kept
    as the stream it went to, not the id: as for an HTTP target's 2xx
    (:mod:`gateway.delivery.answers`), the outcome says what an operator needs, and the result
    is one shared value rather than one made per delivery."""
    if isinstance(reply, bytes | str):
        return _added(stream)
    if isinstance(reply, ResponseError):
        # Redis quotes the first arguments of a command it does not know ("ERR unknown
        # command 'XADD', with args beginning with: 'stream' 'body' '{...") when XADD is
        # renamed or disabled: those are the notification's bytes, and message text and phone
        # numbers never go into an error kept in the outbox, shown and logged. A server that
        # speaks Redis's protocol may quote them in words of its own: what is left is kept as
        # a target's own words are (answers.kept_words: masked, and not at all if it repeats
        # the notification).
        text = str(reply).partition(_ARGS_QUOTED)[0]
        permanent = text.startswith(_PERMANENT)
        return AttemptResult(error=f"redis: {kept_words(body, text)}"[:300], permanent=permanent)
    if isinstance(reply, BaseException):
        return AttemptResult(error=f"redis: {type(reply).__name__}: {reply}"[:300])
    return AttemptResult(error=f"redis: unexpected reply {reply!r}"[:300])


@functools.lru_cache(maxsize=64)
def _added(stream: str) -> AttemptResult:
    return AttemptResult(accepted=True, response_excerpt=f"stream {stream}")


def xadd_commands(
    head: tuple[bytes, ...],
    deliveries: Sequence[Delivery],
    fields: Sequence[Mapping[str, str]],
) -> bytes:
    """One ``XADD`` per delivery, in RESP (arrays of bulk strings): ``head`` (``XADD key
    [MAXLEN ~ n] *``), then the field ``body`` with the delivery's exact bytes, then
    ``fields[i]``, names and values as they are (UTF-8)."""
    start = b"".join(_bulk(arg) for arg in (*head, b"body"))
    fixed = len(head) + 2
    parts: list[bytes] = []
    for delivery, entry in zip(deliveries, fields, strict=True):
        names = tuple(entry)
        form = _FIELDS.get(names)
        if form is None:
            lines = (_bulk(name.encode()).replace(b"%", b"%%") + b"$%d\r\n%s\r\n" for name in names)
            form = _FIELDS.setdefault(names, b"".join(lines))
        values: list[int | bytes] = []
        for value in entry.values():
            data = value.encode()
            values += (len(data), data)
        body = delivery.body
        parts += (b"*%d\r\n" % (fixed + len(values)), start, b"$%d\r\n" % len(body), body)
        parts += (b"\r\n", form % tuple(values))
    return b"".join(parts)


def _bulk(arg: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(arg), arg)


async def read_replies(stream: asyncio.StreamReader, count: int) -> list[object]:
    """The next ``count`` replies on ``stream``, parsed as they arrive, a read at a time; an
    error reply is a :class:`ResponseError` in its place, the others are not affected. Raises
    :class:`ConnectionError` when the connection ends first, :class:`InvalidResponse` on bytes
    that are not RESP."""
    reader = hiredis.Reader(
        protocolError=InvalidResponse, replyError=ResponseError, notEnoughData=_MORE
    )
    replies: list[object] = []
    while len(replies) < count:
        reply = reader.gets()
        if reply is _MORE:
            data = await stream.read(_READ_BYTES)
            if not data:
                raise ConnectionError("connection closed by the server")
            reader.feed(data)
        else:
            replies.append(reply)
    if reader.has_data():  # more than was asked for: the connection is out of step
        raise InvalidResponse("more replies than commands")
    return replies


class RedisStreamSender:
    """Adds deliveries to one Redis stream over connections from redis-py's asyncio pool, each
    kept by the sender between its batches."""

    def __init__(self, target: TargetConfig, tls: ssl.SSLContext | None = None) -> None:
        """``tls``: the context of the target's own ``ca_file`` / ``cert_file``, for a
        ``rediss://`` URL; None: redis-py's TLS for one (the system's trust store)."""
        assert target.stream is not None  # load_config requires it with kind = "redis"
        self.target = target
        self._stream = target.stream
        trim = () if target.maxlen is None else (b"MAXLEN", b"~", b"%d" % target.maxlen)
        self._head = (b"XADD", target.stream.encode(), *trim, b"*")
        options: dict[str, Any] = {
            # No socket_timeout (redis-py 8 sets 5 s unless told): it wraps every write in
            # asyncio.wait_for, a task and a timer per batch; one deadline per batch
            # (send_many, warm, probe) bounds each exchange instead.
            "socket_timeout": None,
            # No max_connections: the dispatcher bounds the batches in flight (one connection
            # each); a pool cap would fail a batch at the cap instead of waiting.
            "socket_connect_timeout": target.timeout_s,
            # RESP2: nothing comes on the connection that was not asked for (RESP3 may send
            # push messages between replies), so a batch's replies are exactly its next ones.
            "protocol": 2,
            # Replies as bytes: probe compares TYPE's reply with b"stream" (redis-py's default,
            # set here so that it is one of the options a URL cannot override).
            "decode_responses": False,
        }
        # Options in the URL's query that redis-py refuses, or that would replace the ones
        # above (redis-py lets the URL's win; rules.REDIS_SENDER_OPTIONS lists them):
        # load_config refuses them, but a target built otherwise fails each delivery (and
        # probe) with the reason, for good, rather than the process or every batch raising,
        # or the sender speaking another protocol than it reads.
        self._refused: str | None = None
        connecting: dict[str, Any] = {}
        if tls is not None:
            # Refused as load_config refuses them: a context never used, or one that would
            # silently replace what the URL's own TLS options ask for.
            self._refused = _tls_refusal(target.url)
            # The caller's connection class wins over the one redis-py picks for the scheme.
            connecting = {"connection_class": _TlsConnection, "tls_context": tls}
        try:
            self._client = aioredis.Redis.from_url(target.url, **options, **connecting)
        except ValueError as exc:  # a value redis-py cannot read ("?db=x")
            self._refused = _refusal(exc)
            self._client = aioredis.Redis(**options)  # never used: nothing is sent
        else:
            if parse_qs(urlsplit(target.url).query).keys() & options.keys():
                self._refused = self._refused or redis_url_refusal(target.url)
        # Connections this sender holds between batches, each taken by one batch at a time.
        self._idle: list[AbstractConnection] = []

    async def send_many(
        self,
        deliveries: Sequence[Delivery],
        attempts: Sequence[int],
        trace_headers: Sequence[Mapping[str, str]] | None = None,
    ) -> list[AttemptResult]:
        if self._refused is not None:
            refused = AttemptResult(error=f"redis: {self._refused}", permanent=True)
            return [refused] * len(deliveries)
        now = time.time()
        fields = [
            delivery_headers(delivery, self.target, attempt, now)
            for delivery, attempt in zip(deliveries, attempts, strict=True)
        ]
        if trace_headers is not None:
            for entry, trace in zip(fields, trace_headers, strict=True):
                entry.update(trace)
        commands = xadd_commands(self._head, deliveries, fields)
        try:
            async with asyncio.timeout(self.target.timeout_s):
                replies = await self._exchange(commands, len(deliveries))
        except TimeoutError:
            failed = AttemptResult(error=f"redis: timed out after {self.target.timeout_s:g}s")
            return [failed] * len(deliveries)
        except _Refused as exc:
            return [AttemptResult(error=str(exc), permanent=True)] * len(deliveries)
        except (RedisError, OSError) as exc:
            failed = AttemptResult(error=f"redis: {type(exc).__name__}: {exc}"[:300])
            return [failed] * len(deliveries)
        added = _added(self._stream)
        return [
            # The usual reply, an entry id, without the general case's checks.
            added if type(reply) is bytes else result_of(reply, self._stream, delivery.body)
            for reply, delivery in zip(replies, deliveries, strict=True)
        ]

    async def _exchange(self, commands: bytes, count: int) -> list[object]:
        """Write every command at once on one connection (connected, authenticated and its
        database selected by redis-py), then read ``count`` replies from it."""
        connection = await self._connection()
        try:
            await connection.send_packed_command(commands)
            # redis-py's own stream of the connection, which send_packed_command has opened.
            stream = connection._reader
            if stream is None:
                raise ConnectionError("connection closed before its replies")
            replies = await read_replies(stream, count)
        except BaseException:
            # Cut off mid-exchange (timeout, reset): unread replies would confuse the next
            # user, so the connection is closed and goes back to the pool, which reconnects it.
            await connection.disconnect()
            await self._client.connection_pool.release(connection)
            raise
        self._idle.append(connection)
        return replies

    async def _connection(self) -> AbstractConnection:
        """An idle connection of this sender's, or a new one from the pool. The sender keeps
        the connections it has used rather than giving each back after its batch: the pool's
        get and release (two lock rounds, a connection check, counters and events) cost more
        CPU than a small batch's whole exchange. A kept connection the server has closed is
        given back for the pool to reconnect."""
        while self._idle:
            connection = self._idle.pop()
            stream = connection._reader
            if stream is not None and not stream.at_eof() and stream.exception() is None:
                return connection
            await connection.disconnect()
            await self._client.connection_pool.release(connection)
        pool = self._client.connection_pool
        try:
            fresh: AbstractConnection = await pool.get_connection()  # type: ignore[no-untyped-call]
        except (TypeError, ValueError) as exc:
            # The connection class refuses an option of the URL's query: so it will each time.
            raise _Refused(f"redis: {_refusal(exc)}") from exc
        return fresh

    async def warm(self) -> None:
        if self._refused is not None:
            return
        try:
            async with asyncio.timeout(self.target.timeout_s):
                await self._client.ping()
        except (RedisError, OSError, TimeoutError):
            pass  # down now: the deliveries wait and are retried
        except (TypeError, ValueError):
            pass  # an option of the URL refused: each delivery says so

    async def probe(self) -> str:
        where = f"target {self.target.name!r}: redis {_host(self.target.url)}"
        if self._refused is not None:
            raise TargetError(f"{where}: {self._refused}")
        try:
            async with asyncio.timeout(self.target.timeout_s):
                kind = await self._client.type(self._stream)
                length = await self._client.xlen(self._stream) if kind == b"stream" else 0
        except (TypeError, ValueError) as exc:
            # Raised by redis-py making the connection: an option of the URL it refuses.
            raise TargetError(f"{where}: {_refusal(exc)}") from exc
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
        # The kept connections go back to the pool first, for aclose to close them with it.
        idle, self._idle = self._idle, []
        for connection in idle:
            await self._client.connection_pool.release(connection)
        await self._client.aclose()


class _TlsConnection(Connection):
    """A connection over TLS with the context built from the target's own files. asyncio
    verifies the server's certificate against the host connected to, the URL's, as the
    context's ``check_hostname`` (on in every context target_tls builds) asks."""

    def __init__(self, *, tls_context: ssl.SSLContext, **kwargs: Any) -> None:
        self._tls_context = tls_context
        super().__init__(**kwargs)

    def _connection_arguments(self) -> Mapping[str, Any]:
        return {**super()._connection_arguments(), "ssl": self._tls_context}


def _tls_refusal(url: str) -> str | None:
    """Why the context of a target's own files cannot be used with ``url``, or None."""
    if not url.startswith("rediss://"):
        return "ca_file and cert_file are for rediss:// URLs: this one is never TLS"
    options = sorted(name for name in parse_qs(urlsplit(url).query) if name.startswith("ssl"))
    if options:
        return (
            f"{options[0]!r} in the URL beside the target's ca_file or cert_file: those make"
            " its TLS, and the URL's option would be ignored"
        )
    return None


class _Refused(RedisError):
    """redis-py refuses to make a connection with the URL's options: no retry can change it."""


def _refusal(exc: BaseException) -> str:
    """The reason redis-py gave for refusing the URL's options. Its messages name the option,
    never the URL or a value."""
    return f"the URL's options are not redis-py's: {type(exc).__name__}: {exc}"[:280]


def _host(url: str) -> str:
    """Host and port of ``url``, never its password."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 6379}"
