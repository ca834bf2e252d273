"""Keep-alive HTTP/1.1 connections to one target, for the forwarder.

Rule: one request at a time per connection, the whole request written in one call, the response
parsed by httptools (llhttp, the parser Node.js uses), and nothing else: no redirects, no cookies,
no proxies, no compression. Forwarding is the dispatcher's hot loop, and a general-purpose client
spent a third of the gateway's CPU on features a webhook POST never uses.

A connection that was idle in the pool may have been closed by the target in the meantime (its
keep-alive timeout). When such a connection fails before any byte of a response arrived, the
request is sent once more on a new connection: the target cannot have acted on a request it never
answered over a connection it had already closed, and deliveries are at-least-once anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

__all__ = ["Response", "Upstream", "UpstreamError"]

_EXCERPT_BYTES = 1024


class UpstreamError(Exception):
    """The target could not be reached or broke the connection; the message says how."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    retry_after: str | None
    excerpt: bytes


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection and the parser for the response currently awaited."""

    def __init__(self) -> None:
        self.transport: asyncio.WriteTransport | None = None
        self.closed = False
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Response] | None = None
        self._reset()

    def _reset(self) -> None:
        self.started = False  # a byte of the response has arrived
        self._status = 0
        self._retry_after: str | None = None
        self._excerpt = bytearray()
        self._headers_done = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.started = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"invalid HTTP response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._headers_done:
            # A response without Content-Length or chunking ends when the connection does.
            self._finish()
        else:
            reason = f": {exc}" if exc else ""
            self._fail(UpstreamError(f"connection closed by the target{reason}"))

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"retry-after":
            self._retry_after = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        room = _EXCERPT_BYTES - len(self._excerpt)
        if room > 0:
            self._excerpt += body[:room]

    def on_message_complete(self) -> None:
        if not self._parser.should_keep_alive():
            self.close()
        self._finish()

    # the request

    def request(self, data: bytes) -> asyncio.Future[Response]:
        assert self.transport is not None
        self._reset()
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self._waiter

    def _finish(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(Response(self._status, self._retry_after, bytes(self._excerpt)))

    def _fail(self, error: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Upstream:
    """A pool of keep-alive connections to the target at ``url``."""

    def __init__(self, url: str) -> None:
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
        # Targets over https are verified against the system's trust store, like any client.
        self._ssl = ssl.create_default_context() if self._https else None
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
        except OSError as exc:  # refused, unreachable, TLS failure (ssl.SSLError is an OSError)
            raise UpstreamError(f"cannot connect to {self._host}:{self._port}: {exc}") from exc
        return connection

    def _reuse(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()  # the most recently used is the least likely closed
            if not connection.closed:
                return connection
        return None

    async def post(self, headers: Mapping[str, str], body: bytes, timeout_s: float) -> Response:
        """POST ``body``; raises :class:`UpstreamError` or :class:`TimeoutError`."""
        data = self._encode(headers, body)
        async with asyncio.timeout(timeout_s):
            connection = self._reuse()
            reused = connection is not None
            if connection is None:
                connection = await self._connect()
            try:
                try:
                    response = await connection.request(data)
                except UpstreamError:
                    if not (reused and not connection.started):
                        raise
                    connection.close()
                    connection = await self._connect()
                    response = await connection.request(data)
            except BaseException:
                connection.close()  # a failure, timeout or cancellation leaves it unusable
                raise
        if connection.closed:
            return response
        self._idle.append(connection)
        return response

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
