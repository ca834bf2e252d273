"""The callback listener: HTTP/1.1 on the TLS connections Meta opens, parsed by httptools.

Rule: this module only turns bytes into calls on :class:`~gateway.edge.callback.Callback` and its
answers back into bytes; :func:`gateway.edge.responses.answer_for` decides every refusal. Answers on
a connection go out in the order the requests came (RFC 9112, section 9.3.2), one request at a time.

Why not aiohttp's server here: the callback serves one path with two methods, and the general
server's per-request machinery cost more than TLS itself (bench/README.md has the figures).
aiohttp still serves the admin API, where convenience matters more than speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections import deque
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, cast
from urllib.parse import parse_qsl, unquote

import httptools

from gateway.config import ListenConfig
from gateway.edge.acceptor import Acceptor, bind
from gateway.edge.callback import Callback
from gateway.edge.proxy_reader import HEADER_TIMEOUT_S, ProxyHeaderReader
from gateway.edge.responses import access_log, answer_for, log_access
from gateway.edge.tls import handshake_failure
from gateway.errors import (
    BadRequest,
    HeadTooLarge,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Rejected,
    RequestTimeout,
    TransferCodingNotImplemented,
    URLTooLong,
    VersionNotSupported,
)
from gateway.tracing import Tracing
from gateway.units import SECONDS

if TYPE_CHECKING:
    from opentelemetry.trace import Span

__all__ = ["Listener"]

log = logging.getLogger(__name__)

SWEEP_EVERY_S = 1 * SECONDS
MAX_HEAD_BYTES = 64 * 1024  # request line and headers together (431 beyond)
MAX_URL_BYTES = 8 * 1024  # (414 beyond)
MAX_QUEUED = 8  # pipelined requests waiting behind the one in flight before reading pauses

# Why a connection stopped reading; it reads again only once no reason is left. What one
# connection holds is so bounded: unsent answers by the transport's high-water mark plus one
# answer (no request is started while the peer does not read), parsed requests by MAX_QUEUED
# plus what the read that filled the queue carried.
_PEER_NOT_READING = 1  # the write buffer is over its high-water mark (pause_writing)
_QUEUE_FULL = 2  # more than MAX_QUEUED requests wait their turn

_SHOWN_PATH = 100  # characters of an unknown path that answers and logs show
_TEXT = b"text/plain; charset=utf-8"
_ALLOW = b"Allow: GET, POST\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Every status line, built once rather than looked up and encoded for each answer.
_STATUS_LINES = {
    status.value: b"HTTP/1.1 %d %s\r\n" % (status.value, status.phrase.encode())
    for status in HTTPStatus
}


class _Refuse(Exception):
    """Raised inside a parser callback: answer ``error`` and close the connection."""

    def __init__(self, error: Rejected) -> None:
        super().__init__(str(error))
        self.error = error


class _Request:
    __slots__ = (
        "body",
        "content_length",
        "expect_continue",
        "keep_alive",
        "method",
        "refusal",
        "signature",
        "size",
        "started",
        "traceparent",
        "url",
    )

    def __init__(self, started: float) -> None:
        self.started = started
        self.url = b""
        self.method = b""
        self.signature: str | None = None
        self.content_length = -1
        self.expect_continue = False
        self.body: list[bytes] = []
        self.size = 0
        self.keep_alive = False
        self.refusal: Rejected | None = None  # set: answer this, then close
        self.traceparent: str | None = None  # the client's, kept only when tracing


class _Clock:
    """The ``Date`` header value, formatted once per second rather than once per answer."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode()
        return self._value


def _response(
    status: int, body: bytes, keep_alive: bool, date: bytes, extra: bytes = b"", head: bool = False
) -> bytes:
    return b"".join(
        (
            _STATUS_LINES[status],
            b"Date: %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n" % (date, _TEXT, len(body)),
            extra,
            b"Connection: keep-alive\r\n\r\n" if keep_alive else b"Connection: close\r\n\r\n",
            b"" if head else body,
        )
    )


def _ack_now(transport: asyncio.BaseTransport) -> None:
    """Acknowledge at once what the kernel would acknowledge up to 40 ms late.

    In TLS 1.3 the client speaks last in the handshake, then sends its request. A client with
    Nagle's algorithm on (ApacheBench, for one) holds the request back until its last handshake
    flight is acknowledged, and the server's kernel delays that acknowledgement when it has
    nothing to send with it (RFC 1122 4.2.3.2, RFC 896). Session tickets used to ride along and
    hide this; without them every new connection would wait out the delayed-ACK timer. Setting
    TCP_QUICKACK sends the pending acknowledgement now (tcp(7)); one system call.
    """
    sock = transport.get_extra_info("socket")
    if sock is not None and hasattr(socket, "TCP_QUICKACK"):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


def _path(raw_url: bytes) -> tuple[str, bytes | None]:
    """The decoded path and the raw query of a request target; raises BadRequest."""
    try:
        url = httptools.parse_url(raw_url)
    except httptools.HttpParserInvalidURLError:
        raise BadRequest("malformed request URL") from None
    return unquote(url.path.decode("latin-1")), url.query


def _shortened(path: str) -> str:
    # Whoever asks chooses the path, and it reaches answers and the log.
    return path if len(path) <= _SHOWN_PATH else path[:_SHOWN_PATH] + "..."


def _not_allowed(method: str) -> MethodNotAllowed:
    return MethodNotAllowed(f"method {method} is not allowed here; use GET or POST")


class _Connection(asyncio.Protocol):
    """One client connection: parse, hand each complete request to the callback in turn."""

    def __init__(self, listener: Listener, remote: str) -> None:
        self._listener = listener
        self._callback = listener.callback
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        # llhttp would refuse HTTP/1.2 or 3.0 as malformed (400); accepted here, they reach the
        # version check in on_headers_complete and get the 505 RFC 9110, 15.6.6 prescribes.
        self._parser.set_dangerous_leniencies(lenient_version=True)
        self._identity_error: Rejected | None = None
        self._request: _Request | None = None  # being received
        self._queue: deque[_Request] = deque()  # received, waiting their turn
        self._in_flight = False
        self._paused = 0  # _PEER_NOT_READING | _QUEUE_FULL: why reading is paused, if it is
        self._stalled_since = 0.0  # when the write buffer last went over its high-water mark
        self._in_head = False  # between a request's first byte and the end of its headers
        self._head_bytes = 0  # the current request's header lines, as parsed
        self._head_read = 0  # the current request's reads that began and ended inside its head
        self._discarding = False  # after a refusal that closes: ignore what else arrives
        self.last_active = 0.0  # when the connection last became idle (time.monotonic)
        self.remote = remote  # the client's address: the TCP peer's, or the PROXY header's
        self.cn: str | None = None
        self.not_after: str | None = None  # the client certificate's, kept only when tracing
        self._tracing = self._callback.tracing

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport is not an asyncio.Transport subclass, but has its methods.
        self._transport = cast(asyncio.Transport, transport)
        if self._listener.closing:
            self._transport.close()
            return
        self._listener.connections.add(self)
        self.last_active = time.monotonic()  # idle from the end of the TLS handshake
        _ack_now(transport)
        # The TLS handshake is complete by now: OpenSSL has verified the chain against the
        # client CA; what remains is Meta's exact CN, checked once for the whole connection.
        ssl_object: ssl.SSLObject | None = transport.get_extra_info("ssl_object")
        try:
            peercert = ssl_object.getpeercert() if ssl_object else None
            if self._tracing is not None and peercert:
                self.not_after = str(peercert.get("notAfter") or "") or None
            self.cn = self._callback.identify(peercert, self.remote)
        except Rejected as exc:
            self._identity_error = exc  # every request on this connection is answered 403

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._queue.clear()
        self._listener.connections.discard(self)
        if self._listener.closing and not self._listener.connections:
            self._listener.drained.set()

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        if self._transport is None:
            return  # lost already: a late read has nowhere to go
        # No activity is recorded here: empty lines between requests reach no parser callback
        # (RFC 9112, 2.2 lets them be ignored), so a peer sending nothing else stays idle.
        # A request's first byte starts the request timeout instead (on_message_begin).
        head = self._request if self._in_head else None  # the head this read continues, if any
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if not isinstance(cause, _Refuse):
                raise
            self._refuse(cause.error)
            return
        except httptools.HttpParserUpgrade:
            self._refuse(BadRequest("protocol upgrades are not supported"))
            return
        except httptools.HttpParserError:
            self._refuse(BadRequest("malformed HTTP request"))
            return
        # A header line that never ends reaches no parser callback, so reads are counted too;
        # but only a read that began and ended inside one and the same head is all head bytes.
        # One that also carries a body, or the end of one request and the start of the next,
        # must not be mistaken for a large head (the first read of a head is left out: it is
        # bounded by the read size, and its complete lines are counted in on_header).
        if head is not None and head is self._request and self._in_head:
            self._head_read += len(data)
            if self._head_read > MAX_HEAD_BYTES:
                self._refuse(HeadTooLarge(f"request head exceeds {MAX_HEAD_BYTES} bytes"))

    def pause_writing(self) -> None:
        # Reading more would only queue more answers the peer does not take: stop both until
        # the buffer drains, and close the connection if it does not (see sweep).
        self._stalled_since = time.monotonic()
        self._pause(_PEER_NOT_READING)

    def resume_writing(self) -> None:
        self._resume(_PEER_NOT_READING)
        self._pump()

    def _pause(self, reason: int) -> None:
        if not self._paused and self._transport is not None:
            self._transport.pause_reading()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        """Withdraw ``reason``; read again only if no other reason to pause is left."""
        if self._paused & reason:
            self._paused &= ~reason
            if not self._paused and self._transport is not None:
                self._transport.resume_reading()

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._request = _Request(time.monotonic())
        self._in_head = True
        self._head_bytes = self._head_read = 0

    def on_url(self, url: bytes) -> None:
        request = self._current()
        request.url += url
        if len(request.url) > MAX_URL_BYTES:
            raise _Refuse(URLTooLong(f"request URL exceeds {MAX_URL_BYTES} bytes"))

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self._current()
        # Counted here for a head that arrives in one read, and in data_received for one that
        # keeps arriving without ever completing a header line.
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_HEAD_BYTES:
            raise _Refuse(HeadTooLarge(f"request head exceeds {MAX_HEAD_BYTES} bytes"))
        name = name.lower()
        if name == b"x-hub-signature-256":
            request.signature = value.decode("latin-1")
        elif name == b"content-length":
            request.content_length = int(value)  # the parser has checked it is digits
        elif name == b"expect":
            request.expect_continue = value.lower() == b"100-continue"
        elif name == b"transfer-encoding" and value.strip().lower() != b"chunked":
            # llhttp frames "gzip, chunked" by its final chunked and would hand over the still
            # compressed bytes; no coding but chunked is understood here (RFC 9112, 6.1: 501).
            raise _Refuse(
                TransferCodingNotImplemented("only the chunked transfer coding is supported")
            )
        elif name == b"traceparent" and self._tracing is not None:
            request.traceparent = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        request = self._current()
        self._in_head = False
        version = self._parser.get_http_version()
        if version != "1.1" and version != "1.0":
            # HTTP/0.9 and 2.0 parse too; neither is spoken here (RFC 9110, 15.6.6).
            raise _Refuse(VersionNotSupported(f"HTTP/{version} is not supported; use HTTP/1.1"))
        request.method = self._parser.get_method()
        request.keep_alive = self._parser.should_keep_alive()
        limit = self._listener.max_body_bytes
        if request.content_length > limit:
            raise _Refuse(
                PayloadTooLarge(f"body of {request.content_length} bytes exceeds {limit}")
            )
        if request.expect_continue and version == "1.1":
            # An HTTP/1.0 client's expectation is ignored: it cannot know 100 (RFC 9110, 10.1.1).
            self._expect_continue(request)

    def on_body(self, chunk: bytes) -> None:
        request = self._current()
        request.size += len(chunk)
        limit = self._listener.max_body_bytes
        if request.size > limit:  # a chunked body announces no length
            raise _Refuse(PayloadTooLarge(f"body exceeds {limit} bytes"))
        request.body.append(chunk)

    def on_message_complete(self) -> None:
        request = self._current()
        self._request = None
        self._queue.append(request)
        if len(self._queue) > MAX_QUEUED:
            self._pause(_QUEUE_FULL)
        self._pump()

    # -- answering -------------------------------------------------------------------------

    def _current(self) -> _Request:
        assert self._request is not None, "parser callback outside a message"
        return self._request

    def _refuse(self, error: Rejected) -> None:
        """Answer ``error`` after the answers still owed, then close: the rest of the stream
        cannot be trusted to be where the parser stopped."""
        self._discarding = True
        request = self._request or _Request(time.monotonic())
        self._request = None
        request.refusal = error
        request.keep_alive = False
        self._queue.append(request)
        self._pump()

    def _pump(self) -> None:
        # No new answer while the peer does not read the ones it has (resume_writing pumps).
        while (
            not self._in_flight
            and self._queue
            and not self._paused & _PEER_NOT_READING
            and self._transport is not None
        ):
            self._start(self._queue.popleft())
        if self._paused & _QUEUE_FULL and len(self._queue) <= MAX_QUEUED:
            self._resume(_QUEUE_FULL)

    def _expect_continue(self, request: _Request) -> None:
        """``Expect: 100-continue``: the client waits for 100 before it sends the body.

        100 promises the body will be read (RFC 9110, 10.1.1), so it goes out only once every
        refusal that needs no body is ruled out; a request that will be refused gets that final
        answer now instead, and the connection closes, since the body may follow it or not."""
        if self._identity_error is not None:
            raise _Refuse(self._identity_error)
        try:
            path, _ = _path(request.url)
        except Rejected as exc:
            raise _Refuse(exc) from None
        if path != self._listener.path:
            raise _Refuse(NotFound(f"no such path: {_shortened(path)!r}"))
        if request.method != b"POST":
            if request.method not in (b"GET", b"HEAD"):
                raise _Refuse(_not_allowed(request.method.decode("latin-1")))
            return  # a handshake carries no body to wait for
        if not self._in_flight and not self._queue:
            # Only when no earlier answer is still owed on this connection: 100 must not come
            # before those (RFC 9112, 9.3.2); the client sends the body after its own wait.
            self._write(_CONTINUE)

    def _start(self, request: _Request) -> None:
        method = request.method.decode("latin-1")
        path = "-"
        try:
            if request.refusal is not None:
                raise request.refusal
            if self._identity_error is not None:
                raise self._identity_error
            path, query = _path(request.url)
            if path != self._listener.path:
                path = _shortened(path)
                raise NotFound(f"no such path: {path!r}")
            if method == "POST":
                self._in_flight = True
                tracing = self._tracing
                span = (
                    None
                    if tracing is None
                    else tracing.server_span(path, self.cn, self.not_after, request.traceparent)
                )
                task = asyncio.ensure_future(
                    self._callback.notify(b"".join(request.body), request.signature, span)
                )
                task.add_done_callback(lambda done: self._notified(request, path, done, span))
                return
            if method not in ("GET", "HEAD"):
                raise _not_allowed(method)
            params: dict[str, str] = {}
            for name, value in parse_qsl(
                (query or b"").decode("utf-8", "replace"), keep_blank_values=True
            ):
                params.setdefault(name, value)  # the first of repeated names, as aiohttp does
            self._answer(request, method, path, 200, self._callback.handshake(params))
        except Exception as exc:
            self._answer(request, method, path, *answer_for(exc, method, path))

    def _notified(
        self, request: _Request, path: str, done: asyncio.Future[str], span: Span | None
    ) -> None:
        self._in_flight = False
        if done.cancelled():
            status, reason = 503, "shutting down; retry later"
        elif (error := done.exception()) is not None:
            status, reason = answer_for(error, "POST", path)
        else:
            status, reason = 200, done.result()
        self._answer(request, "POST", path, status, reason)
        if span is not None:
            Tracing.end_server(span, status)
        self._pump()

    def _answer(self, request: _Request, method: str, path: str, status: int, reason: str) -> None:
        keep_alive = request.keep_alive and not self._listener.closing
        now = self.last_active = time.monotonic()  # idle from the last answer
        body = (reason + "\n").encode() if status != 200 or method == "POST" else reason.encode()
        self._write(
            _response(
                status,
                body,
                keep_alive,
                self._listener.clock.date(),
                _ALLOW if status == 405 else b"",
                head=method == "HEAD",
            )
        )
        seconds = now - request.started
        self._callback.answered(status, seconds)
        if self._listener.log_requests:
            log_access(self.remote, method, path, status, len(body), seconds, self.cn)
        if not keep_alive and self._transport is not None:
            self._discarding = True
            self._queue.clear()
            self._transport.close()

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    # -- housekeeping (from the listener) --------------------------------------------------

    def sweep(self, now: float) -> None:
        """Close a keep-alive connection idle too long, or one whose peer has not read its
        answers for as long; answer 408 to a request too slow."""
        if self._transport is None:
            return
        if self._paused & _PEER_NOT_READING:
            if now - self._stalled_since > self._listener.idle_timeout_s:
                log.info("closing a connection from %s: its answers are not read", self.remote)
                # Not close(): that would wait to send the buffered answers, for ever.
                self._transport.abort()
            return
        if self._in_flight or self._queue:
            return
        if self._request is not None:
            if now - self._request.started > self._listener.request_timeout_s:
                self._refuse(RequestTimeout("request not received in time"))
        elif now - self.last_active > self._listener.idle_timeout_s:
            self._transport.close()

    def close_when_idle(self) -> None:
        """At shutdown: close now unless an answer is owed (then after it, see _answer)."""
        if not self._in_flight and not self._queue and self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class Listener:
    """The callback's TLS server: ``await start(...)``, then ``await close(grace_s)``."""

    def __init__(self, callback: Callback, settings: ListenConfig) -> None:
        self.callback = callback
        self.path = settings.path
        self.max_body_bytes = settings.max_body_bytes
        self.idle_timeout_s = settings.idle_timeout_s
        self.request_timeout_s = settings.request_timeout_s
        self.connections: set[_Connection] = set()
        self.closing = False
        self.drained = asyncio.Event()  # set when closing and the last connection is gone
        self.clock = _Clock()
        self.log_requests = access_log.isEnabledFor(logging.INFO)
        self._acceptor: Acceptor | None = None
        self.proxy_protocol = settings.proxy_protocol
        self._sweeper: asyncio.TimerHandle | None = None
        # Often enough that a short timeout is kept to within a quarter of itself.
        self._sweep_every_s = min(
            SWEEP_EVERY_S, self.idle_timeout_s / 4, self.request_timeout_s / 4
        )

    async def start(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        *,
        sock: socket.socket | None = None,
    ) -> int:
        """Listen on ``host:port``, or accept on ``sock`` (a listening socket the supervisor of
        several workers bound and shares with them); return the bound port (useful with 0)."""
        before_tls = None
        if self.proxy_protocol:
            # The balancer's header first: it names the client (gateway.edge.proxy_reader).
            timeout_s = min(HEADER_TIMEOUT_S, self.request_timeout_s)
            before_tls = ProxyHeaderReader(self.callback.stats, timeout_s)
        self._acceptor = Acceptor(
            sock if sock is not None else bind(host, port),
            ssl_context,
            lambda remote: _Connection(self, remote),
            self._handshake_failed,
            before_tls,
        )
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(self._sweep_every_s, self._sweep)
        return self._acceptor.port

    def _handshake_failed(self, remote: str, exc: OSError) -> None:
        """One log line and a count for a TLS handshake that failed."""
        if self.closing:
            return  # aborted by close(): the gateway's doing, not the client's
        reason, detail = handshake_failure(exc)
        # A peer that leaves without a word of TLS is what TCP health checks do: counted,
        # logged only when debugging.
        log.log(
            logging.DEBUG if reason == "closed" else logging.INFO,
            "TLS handshake from %s failed: %s (%s)",
            remote,
            reason,
            detail,
        )
        self.callback.stats.tls_handshake_failed(reason)

    def _sweep(self) -> None:
        now = time.monotonic()
        for connection in list(self.connections):
            connection.sweep(now)
        self._sweeper = asyncio.get_running_loop().call_later(self._sweep_every_s, self._sweep)

    async def close(self, grace_s: float) -> None:
        """Stop accepting; let answers owed go out (up to ``grace_s``); close every connection."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._acceptor is None:
            return
        self._acceptor.close()
        for connection in list(self.connections):
            connection.close_when_idle()
        if self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.drained.wait(), grace_s)
        for connection in list(self.connections):
            log.warning("closing a connection with an answer still owed (grace over)")
            connection.abort()
        await self._acceptor.wait_closed()
