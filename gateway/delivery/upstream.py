"""Keep-alive HTTP/1.1 connections to one target, for the forwarder.

Rule: requests are pipelined (RFC 9112 section 9.3.2): the forwarder hands over the deliveries
that came due together, they are written to one connection in one call, and the responses, which
a server must send in the order of the requests, are parsed by httptools (llhttp, the parser
Node.js uses) as they arrive. Nothing else: no redirects, no cookies, no proxies, no compression.
Forwarding is the dispatcher's hot loop: a general-purpose client spent a third of the gateway's
CPU on features a webhook POST never uses, and one write and one read per batch instead of per
request halve what forwarding costs. The RFC asks a client not to pipeline after a non-idempotent
method unless it can recover from a partial failure; deliveries are at-least-once and carry
``X-Gateway-Delivery-Id`` for exactly that, and a target's ``pipeline = 1`` turns it off.

Two failures are not the target's answer to a request, so the request is sent again on a new
connection and no attempt is counted:

- A response that closes the connection (``Connection: close``) leaves the requests behind it
  unanswered; RFC 9112 section 9.6 forbids the server to have processed them.
- A connection that was idle in the pool may have been closed by the target in the meantime (its
  keep-alive timeout). When such a connection fails before any byte of a response arrived, the
  requests are sent once more: the target cannot have acted on requests it never answered over a
  connection it had already closed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

__all__ = ["Response", "Upstream", "UpstreamError"]

_EXCERPT_BYTES = 1024


class UpstreamError(Exception):
    """The target could not be reached or broke the connection; the message says how."""


class _NotProcessed(UpstreamError):
    """The target closed the connection, as its previous response said it would, before this
    request's turn came: it was not processed (RFC 9112 section 9.6)."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    retry_after: str | None
    excerpt: bytes
    content_type: str | None = None


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection and the parser for the responses awaited on it, in order."""

    def __init__(self) -> None:
        self.transport: asyncio.WriteTransport | None = None
        self.closed = False
        self.started = False  # a byte of a response arrived since the last write
        self._parser = httptools.HttpResponseParser(self)
        self._waiters: collections.deque[asyncio.Future[Response]] = collections.deque()
        self.on_message_begin()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return  # after a "Connection: close" response: nothing more is read
        self.started = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail_all(UpstreamError(f"invalid HTTP response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._headers_done:
            # A response without Content-Length or chunking ends when the connection does.
            self._finish()
        reason = f": {exc}" if exc else ""
        self._fail_all(UpstreamError(f"connection closed by the target{reason}"))

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._status = 0
        self._retry_after: str | None = None
        self._content_type: str | None = None
        self._excerpt = bytearray()
        self._headers_done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered == b"retry-after":
            self._retry_after = value.decode("latin-1")
        elif lowered == b"content-type":
            self._content_type = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        room = _EXCERPT_BYTES - len(self._excerpt)
        if room > 0:
            self._excerpt += body[:room]

    def on_message_complete(self) -> None:
        self._finish()
        if not self._parser.should_keep_alive():
            self._fail_all(_NotProcessed("the target closed the connection first"))
            self.close()

    # the requests

    def request_many(self, requests: Sequence[bytes]) -> list[asyncio.Future[Response]]:
        """Write ``requests`` in one call; a future for each response, in the same order."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in requests]
        self._waiters.extend(futures)
        self.started = False
        self.transport.write(b"".join(requests))
        return futures

    @property
    def idle(self) -> bool:
        return not self.closed and not self._waiters

    def _finish(self) -> None:
        self._headers_done = False
        if self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(
                    Response(
                        self._status, self._retry_after, bytes(self._excerpt), self._content_type
                    )
                )

    def _fail_all(self, error: Exception) -> None:
        waiters, self._waiters = self._waiters, collections.deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(error)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _abandon(futures: Sequence[asyncio.Future[Response]]) -> None:
    """Give up on ``futures``, whose answers no one will read: one still waiting is
    cancelled (the connection's end then leaves it be), and the error of one already failed
    is taken, or asyncio would report it as never retrieved ("Future exception was never
    retrieved") once the future is collected."""
    for future in futures:
        if not future.done():
            future.cancel()
        elif not future.cancelled():
            future.exception()


class Upstream:
    """A pool of keep-alive connections to the target at ``url``; over https, verified with
    ``tls`` if given, else against the system's trust store."""

    def __init__(self, url: str, tls: ssl.SSLContext | None = None) -> None:
        parts = urlsplit(url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._https else 80)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        default_port = self._port == (443 if self._https else 80)
        host_header = self._host if default_port else f"{self._host}:{self._port}"
        if ":" in self._host:  # an IPv6 literal goes in brackets (RFC 9110 section 7.2)
            host_header = f"[{self._host}]" + ("" if default_port else f":{self._port}")
        self._head = (f"POST {target} HTTP/1.1\r\nHost: {host_header}\r\n").encode("latin-1")
        # Targets over https are verified against the system's trust store, like any client,
        # unless the target names a CA of its own (gateway.delivery.target_tls).
        self._ssl = (tls or ssl.create_default_context()) if self._https else None
        self._idle: list[_Connection] = []

    def _encode(self, headers: Mapping[str, str], body: bytes) -> bytes:
        lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        return b"".join(
            (self._head, lines.encode("latin-1"), b"Content-Length: %d\r\n\r\n" % len(body), body)
        )

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await loop.create_connection(
                _Connection,
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._host if self._ssl else None,
            )
        # Refused, unreachable, TLS failure (ssl.SSLError is an OSError); or a host name the
        # resolver will not encode (an empty or over-long label: UnicodeError, a ValueError).
        except (OSError, ValueError) as exc:
            raise UpstreamError(f"cannot connect to {self._host}:{self._port}: {exc}") from exc
        return connection

    def _reuse(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()  # the most recently used is the least likely closed
            if connection.idle:
                return connection
        return None

    async def post(self, headers: Mapping[str, str], body: bytes, timeout_s: float) -> Response:
        """POST ``body``; raises :class:`UpstreamError` or :class:`TimeoutError`."""
        (answer,) = await self.post_many([(headers, body)], timeout_s)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def post_many(
        self, requests: Sequence[tuple[Mapping[str, str], bytes]], timeout_s: float
    ) -> list[Response | UpstreamError | TimeoutError]:
        """POST each ``(headers, body)``, pipelined on one connection; for each, in order, its
        response or the error that kept it from one. The target has ``timeout_s`` to connect,
        and ``timeout_s`` for each response from the one before."""
        data = [self._encode(headers, body) for headers, body in requests]
        answers: list[Response | UpstreamError | TimeoutError | None] = [None] * len(data)
        todo = list(range(len(data)))
        stale_retry = True
        while todo:
            connection = self._reuse()
            reused = connection is not None
            if connection is None:
                try:
                    async with asyncio.timeout(timeout_s):
                        connection = await self._connect()
                except (UpstreamError, TimeoutError) as exc:
                    for index in todo:
                        answers[index] = exc
                    break
            todo, stale_retry = await self._exchange(
                connection, data, todo, answers, timeout_s, stale_retry and reused
            )
            if connection.idle:
                self._idle.append(connection)
        assert all(answer is not None for answer in answers)
        return answers  # type: ignore[return-value]

    async def _exchange(
        self,
        connection: _Connection,
        data: Sequence[bytes],
        todo: list[int],
        answers: list[Response | UpstreamError | TimeoutError | None],
        timeout_s: float,
        stale_retry: bool,
    ) -> tuple[list[int], bool]:
        """Send ``todo`` on ``connection``, fill in ``answers``; the indexes to send again on
        another connection, and whether a stale-connection retry is still allowed."""
        futures = connection.request_many([data[index] for index in todo])
        again: list[int] = []
        try:
            for position, (index, future) in enumerate(zip(todo, futures, strict=True)):
                try:
                    if not future.done():
                        async with asyncio.timeout(timeout_s):
                            await future
                    answers[index] = future.result()
                except _NotProcessed:
                    again.append(index)
                except UpstreamError as exc:
                    if stale_retry and not connection.started:
                        # Closed while idle in the pool: the rest go once more, on a new one.
                        _abandon(futures[position + 1 :])
                        return again + todo[position:], False
                    answers[index] = exc
                except TimeoutError as exc:
                    # Nothing more will come in time on this connection: what was not answered
                    # has timed out too.
                    connection.close()
                    _abandon(futures[position + 1 :])
                    for rest in todo[position:]:
                        answers[rest] = exc
                    return again, stale_retry
        except BaseException:
            connection.close()  # cancelled: the connection is left mid-exchange, unusable
            _abandon(futures)
            raise
        return again, stale_retry

    async def warm(self, timeout_s: float) -> None:
        """Put one open connection in the pool, if the target answers the connect."""
        with contextlib.suppress(UpstreamError, TimeoutError):
            async with asyncio.timeout(timeout_s):
                self._idle.append(await self._connect())

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
        with contextlib.suppress(Exception):
            await asyncio.sleep(0)  # let the transports run their close callbacks
