"""The callback listener: the HTTP/1.1 core of :mod:`gateway.edge.http1` on Meta's TLS connections.

Rule: this module only moves bytes: it feeds each read to the connection's
:class:`~gateway.edge.http1.Http1`, hands each complete request to
:class:`~gateway.edge.callback.Callback` and writes its answer back; :mod:`gateway.edge.http1`
decides what the bytes mean and :func:`gateway.edge.responses.answer_for` every refusal. It holds
what needs I/O and time: transports, flow control and the timers. Answers on a connection go out
in the order the requests came (RFC 9112, section 9.3.2), one request at a time.

Why not aiohttp's server here: the callback serves one path with two methods, and the general
server's per-request machinery costs more than TLS itself (bench/README.md has the figures).
aiohttp still serves the admin API, where convenience matters more than speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Mapping
from email.utils import formatdate
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qsl

from gateway.config import ListenConfig
from gateway.edge.acceptor import Acceptor, bind
from gateway.edge.callback import Callback
from gateway.edge.http1 import (
    CONTINUE_LINE,
    Http1,
    Limits,
    Refusal,
    Request,
    not_allowed,
    response,
    shortened,
    split_target,
)
from gateway.edge.proxy_reader import HEADER_TIMEOUT_S, ProxyHeaderReader
from gateway.edge.responses import access_log, answer_for, log_access
from gateway.edge.tls import handshake_failure
from gateway.errors import NotFound, Rejected, RequestTimeout
from gateway.outbox import settle_from
from gateway.units import SECONDS

if TYPE_CHECKING:
    # Annotations only: with tracing off no OpenTelemetry module is imported at all.
    from gateway.tracing import Notified, Tracing

__all__ = ["Listener"]

log = logging.getLogger(__name__)

SWEEP_EVERY_S = 1 * SECONDS
# What one connection may make the gateway hold: unsent answers up to the transport's high-water
# mark plus one answer (no request is started while the peer does not read), and parsed requests
# up to MAX_QUEUED plus what the read that filled the queue carried.
MAX_QUEUED = 8  # pipelined requests waiting behind the one in flight before reading pauses

_ALLOW = b"Allow: GET, POST\r\n"


class _Pause(enum.Enum):
    """Why a connection stopped reading; it reads again only once no reason is left."""

    PEER_NOT_READING = "the write buffer is over its high-water mark (pause_writing)"
    QUEUE_FULL = "more than MAX_QUEUED requests wait their turn"


class _Clock:
    """The ``Date`` header value, formatted once per second rather than once per answer, and
    the acknowledgements' whole bytes, built once per second too (they differ only in it)."""

    __slots__ = ("_acks", "_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""
        self._acks: dict[tuple[str, bool], bytes] = {}

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode()
            self._acks = {}
        return self._value

    def ack(self, reason: str, keep_alive: bool) -> bytes:
        """The answer to a POST with 200 and ``reason`` (one of the callback's two)."""
        date = self.date()
        found = self._acks.get((reason, keep_alive))
        if found is None:
            found = response(200, (reason + "\n").encode(), keep_alive, date)
            self._acks[(reason, keep_alive)] = found
        return found


def _ack_now(transport: asyncio.BaseTransport) -> None:
    """Acknowledge at once what the kernel would acknowledge up to 40 ms late.

    In TLS 1.3 the client speaks last in the handshake, then sends its request. A client with
    Nagle's algorithm on (ApacheBench, for one) holds the request back until its last handshake
    flight is acknowledged, and the server's kernel delays that acknowledgement when it has
    nothing to send with it (RFC 1122 4.2.3.2, RFC 896). Session tickets would ride along and
    hide this, but they are off by default (``tls.session_tickets``): every new connection would
    wait out the delayed-ACK timer. Setting
    TCP_QUICKACK sends the pending acknowledgement now (tcp(7)); one system call.
    """
    sock = transport.get_extra_info("socket")
    if sock is not None and hasattr(socket, "TCP_QUICKACK"):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


class _Answering:
    """A notification's answer, given as the outbox settles it (the
    :class:`~gateway.outbox.Settles` it is handed): at once, on the event loop's thread, where a
    future would run its done callback at the loop's next turn. A traced one (``traced``) is
    settled from its future's done callback instead (:func:`~gateway.outbox.settle_from`)."""

    __slots__ = ("_connection", "_path", "_request", "_settled", "_traced")

    def __init__(
        self,
        connection: _Connection,
        request: Request,
        path: str,
        traced: Notified | None = None,
    ) -> None:
        self._connection = connection
        self._request = request
        self._path = path
        self._traced = traced
        self._settled = False

    def done(self) -> bool:
        return self._settled

    def set_result(self, reason: str, /) -> None:
        self._settled = True
        self._connection._notified(self._request, self._path, reason, None, self._traced)

    def set_exception(self, exception: BaseException, /) -> None:
        self._settled = True
        self._connection._notified(self._request, self._path, None, exception, self._traced)


class _Connection(asyncio.Protocol):
    """One client connection: feed its reads to the core, answer each request in turn."""

    def __init__(self, listener: Listener, remote: str) -> None:
        self._listener = listener
        self._callback = listener.callback
        self._transport: asyncio.Transport | None = None
        self._http = Http1(listener.limits, listener.path)
        self._identity_error: Rejected | None = None
        self._queue: deque[Request | Refusal] = deque()  # received, waiting their turn
        self._in_flight = False
        # 100 Continue for the request being received, held until the answers owed before it
        # are written (RFC 9112, 9.3.2: responses go in the order of their requests); dropped
        # once that request is complete or refused, since then its final answer is what comes.
        self._continue_owed = False
        # The trust this connection was accepted under was replaced (see retire): every answer
        # from now on closes it.
        self._retired = False
        self._paused: set[_Pause] = set()
        self._stalled_since = 0.0  # when the write buffer last went over its high-water mark
        self.last_active = 0.0  # when the connection last became idle (time.monotonic)
        self.remote = remote  # the client's address: the TCP peer's, or the PROXY header's
        self.cn: str | None = None
        self._tracing: Tracing | None = self._callback.tracing
        # A traced request's SERVER span attributes known at the handshake (only when tracing).
        self._span_attributes: Mapping[str, Any] = {}

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
        # Decided from the certificate's bytes: the same certificate as on the last connection
        # has the same verdict (gateway.edge.identity.Verdicts), and decoding it anew costs
        # more than the check itself.
        ssl_object = transport.get_extra_info("ssl_object")
        der = None if ssl_object is None else ssl_object.getpeercert(binary_form=True)
        try:
            self.cn, not_after = self._callback.identify_certificate(
                der, lambda: transport.get_extra_info("peercert"), self.remote
            )
            if self._tracing is not None:
                from gateway.tracing import server_attributes  # tracing is on: imported already

                self._span_attributes = server_attributes(
                    self._listener.path,
                    self.cn,
                    not_after,
                    self.remote,
                    transport.get_extra_info("peername"),
                )
        except Rejected as exc:
            # Every request on this connection is answered 403, and none gets 100 Continue.
            self._identity_error = self._http.refuse_every_request = exc

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._queue.clear()
        self._listener.connections.discard(self)
        if self._listener.closing and not self._listener.connections:
            self._listener.drained.set()

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None:
            return  # lost already: a late read has nowhere to go
        if transport.is_closing():
            return  # after the last answer, or a refusal: the rest is not read
        # No activity is recorded here: empty lines between requests complete no event (RFC
        # 9112, 2.2 lets them be ignored), so a peer sending nothing else stays idle. A
        # request's first byte starts the request timeout instead (Http1.receiving_since).
        for event in self._http.feed(data, time.monotonic()):
            if isinstance(event, Request):
                self._continue_owed = False
                self._queue.append(event)
                if len(self._queue) > MAX_QUEUED:
                    self._pause(_Pause.QUEUE_FULL)
                self._pump()
            elif isinstance(event, Refusal):
                self._continue_owed = False
                self._queue.append(event)
                self._pump()
            elif not self._in_flight and not self._queue:  # Continue, if no answer is owed
                self._write(CONTINUE_LINE)
            else:
                self._continue_owed = True  # after the answers owed before it (_pump)

    def pause_writing(self) -> None:
        # Reading more would only queue more answers the peer does not take: stop both until
        # the buffer drains, and close the connection if it does not (see sweep).
        self._stalled_since = time.monotonic()
        self._pause(_Pause.PEER_NOT_READING)

    def resume_writing(self) -> None:
        self._resume(_Pause.PEER_NOT_READING)
        self._pump()

    def _pause(self, reason: _Pause) -> None:
        transport = self._transport
        if not self._paused and transport is not None and not transport.is_closing():
            transport.pause_reading()
        self._paused.add(reason)

    def _resume(self, reason: _Pause) -> None:
        """Withdraw ``reason``; read again only if no other reason to pause is left."""
        if reason in self._paused:
            self._paused.discard(reason)
            transport = self._transport
            if not self._paused and transport is not None and not transport.is_closing():
                transport.resume_reading()

    # -- answering -------------------------------------------------------------------------

    def _pump(self) -> None:
        # No new answer while the peer does not read the ones it has (resume_writing pumps),
        # and none at all once the connection is closing.
        # (An empty set is asked first: a member's hash is a Python call, on every request.)
        while (
            not self._in_flight
            and self._queue
            and not (self._paused and _Pause.PEER_NOT_READING in self._paused)
            and self._transport is not None
            and not self._transport.is_closing()
        ):
            self._start(self._queue.popleft())
        if self._continue_owed and not self._in_flight and not self._queue:
            self._continue_owed = False
            self._write(CONTINUE_LINE)
        if self._paused and _Pause.QUEUE_FULL in self._paused and len(self._queue) <= MAX_QUEUED:
            self._resume(_Pause.QUEUE_FULL)

    def _start(self, request: Request | Refusal) -> None:
        method = request.method.decode("latin-1")
        path = "-"
        try:
            if isinstance(request, Refusal):
                raise request.error
            if self._identity_error is not None:
                raise self._identity_error
            if request.url == self._listener.raw_path:
                path, query = self._listener.path, None  # what split_target would make of it
            else:
                path, query = split_target(request.url)
            if path != self._listener.path:
                path = shortened(path)
                raise NotFound(f"no such path: {path!r}")
            if method == "POST":
                # No task per request: a bad signature or body is raised here and answered
                # at once, a stored one resolves the future after its commit.
                tracing = self._tracing
                if tracing is None:
                    # Answered from the outbox's own settling, with no future in between.
                    self._callback.notify_into(
                        request.body, request.signature, _Answering(self, request, path)
                    )
                    self._in_flight = True
                    return
                traced = tracing.notified(path, self._span_attributes, request.traceparent)
                try:
                    answer = self._callback.notify_soon(request.body, request.signature, traced)
                except Exception as exc:
                    status, reason = answer_for(exc, method, path)
                    self._answer(request, method, path, status, reason)
                    tracing.end_notified(traced, status, exc)
                    return
                self._in_flight = True
                answering = _Answering(self, request, path, traced)
                answer.add_done_callback(lambda done: settle_from(answering, done))
                return
            if method not in ("GET", "HEAD"):
                raise not_allowed(method)
            params: dict[str, str] = {}
            for name, value in parse_qsl(
                (query or b"").decode("utf-8", "replace"), keep_blank_values=True
            ):
                params.setdefault(name, value)  # the first of repeated names, as aiohttp does
            self._answer(request, method, path, 200, self._callback.handshake(params))
        except Exception as exc:
            self._answer(request, method, path, *answer_for(exc, method, path))

    def _notified(
        self,
        request: Request,
        path: str,
        reason: str | None,
        error: BaseException | None,
        traced: Notified | None = None,
    ) -> None:
        """Answer a notification the outbox has settled: stored (``reason``) or not (``error``)."""
        self._in_flight = False
        if error is None:
            status, reason = 200, reason or ""
        elif isinstance(error, asyncio.CancelledError):
            status, reason = 503, "shutting down; retry later"
        else:
            status, reason = answer_for(error, "POST", path)
        self._answer(request, "POST", path, status, reason)
        if traced is not None and self._tracing is not None:
            # The SERVER span ends with the status answered; a failure is the commit's.
            self._tracing.end_notified(traced, status, error)
        self._pump()

    def _answer(
        self, request: Request | Refusal, method: str, path: str, status: int, reason: str
    ) -> None:
        keep_alive = isinstance(request, Request) and request.keep_alive
        keep_alive = keep_alive and not self._listener.closing and not self._retired
        now = self.last_active = time.monotonic()  # idle from the last answer
        if status == 200 and method == "POST":
            # Every acknowledgement: its bytes are made once a second, not once an answer.
            self._write(self._listener.clock.ack(reason, keep_alive))
            size = len(reason) + 1
        else:
            body = (reason + "\n").encode() if status != 200 else reason.encode()
            self._write(
                response(
                    status,
                    body,
                    keep_alive,
                    self._listener.clock.date(),
                    _ALLOW if status == 405 else b"",
                    head=method == "HEAD",
                )
            )
            size = len(body)
        seconds = now - request.started
        self._callback.answered(status, seconds)
        if self._listener.log_requests:
            log_access(self.remote, method, path, status, size, seconds, self.cn)
        if not keep_alive and self._transport is not None:
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
        if _Pause.PEER_NOT_READING in self._paused:
            if now - self._stalled_since > self._listener.idle_timeout_s:
                log.info("closing a connection from %s: its answers are not read", self.remote)
                # Not close(): that would wait to send the buffered answers, for ever.
                self._transport.abort()
            return
        if self._in_flight or self._queue:
            return
        started = self._http.receiving_since
        if started is not None:
            if now - started > self._listener.request_timeout_s:
                refusal = self._http.refuse(RequestTimeout("request not received in time"), now)
                if refusal is not None:
                    self._queue.append(refusal)
                    self._pump()
        elif now - self.last_active > self._listener.idle_timeout_s:
            self._transport.close()

    def retire(self) -> None:
        """The trust this connection's client certificate was checked under has been replaced
        (a reload changed the client CA bundle, the CRL or the accepted CNs): the answers owed,
        and the one to a request already arriving, go out with ``Connection: close``; an idle
        connection closes now. The client connects again and its certificate is checked under
        the trust now configured: a revoked certificate ends with the reload, not with the
        connection's own end, which a keep-alive client may put off for hours."""
        self._retired = True
        if (
            not self._in_flight
            and not self._queue
            and self._http.receiving_since is None
            and self._transport is not None
        ):
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
        # The request target every notification names, byte for byte: one that needs no
        # decoding (no escape, no query) is compared as bytes, without parsing it.
        plain = settings.path.isascii() and "%" not in settings.path and "?" not in settings.path
        self.raw_path = settings.path.encode("ascii") if plain else None
        self.limits = Limits(max_body_bytes=settings.max_body_bytes)
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

    def retire_connections(self) -> None:
        """Every open connection ends once it has answered what it owes (see
        :meth:`_Connection.retire`); those accepted from now on are not affected."""
        for connection in list(self.connections):
            connection.retire()

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
