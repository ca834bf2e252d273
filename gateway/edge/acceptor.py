"""Accepting the callback's TCP connections and completing their TLS handshake.

Rule: a connection's protocol hears of it only once its TLS handshake is complete, a handshake
that fails is reported with its error, and both hold alike on every event loop the gateway offers.

Why not ``create_server(ssl=...)``: asyncio and uvloop drop a connection whose handshake fails
without a word to the application, and a certificate refused (Meta's during the mTLS roll-out,
or anyone's) is what an operator needs to see.

Why not ``create_server()`` and then ``start_tls()`` on each connection: the accepted
transport then belongs, for a moment, to a plain protocol that must not read the client's first
bytes before ``start_tls`` puts the TLS protocol in its place. asyncio honours
``pause_reading()`` called in ``connection_made``; uvloop starts reading after
``connection_made`` returns whatever it asked (``UVBaseTransport._call_connection_made``), so
the ClientHello goes to the plain protocol and is lost whenever it arrives before ``start_tls``
runs (about half of all new connections), and the handshake waits for it until its timeout.
Here each accepted socket goes to ``connect_accepted_socket(ssl=...)``: the TLS protocol owns
it from its first byte.

On asyncio's own loop the TLS protocol is made here rather than by ``ssl=...``, the same class
with a read buffer of 64 KiB instead of 256 KiB: asyncio allocates and zeroes that buffer for
every connection (a quarter of a million instructions, about 2 % of a new connection's CPU with
its handshake), and each TLS read asks OpenSSL for up to that many bytes. 64 KiB still holds
four full TLS records per read. The handshake, its timeout and every check are asyncio's, as
with ``ssl=...``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from asyncio import selector_events
from collections.abc import Awaitable, Callable

from gateway.edge.tls_reads import TLSReads
from gateway.units import SECONDS

__all__ = ["BACKLOG", "Acceptor", "bind"]

log = logging.getLogger(__name__)

BACKLOG = 1024  # connections the kernel queues before accept (listen(2))
TLS_HANDSHAKE_TIMEOUT_S = 30 * SECONDS
_RETRY_ACCEPT_S = 1 * SECONDS


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on the first address ``host`` resolves to; raises OSError."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no conflict
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


READ_BUFFER_BYTES = 64 * 1024  # a TLS connection's read buffer on asyncio's loop


class _TLSProtocol(TLSReads):
    """asyncio's TLS protocol with a smaller read buffer (see the module docstring), reading
    without an exception per read (gateway.edge.tls_reads)."""

    max_size = READ_BUFFER_BYTES


# Before the handshake, given the accepted socket and its peer: the client's address (a PROXY
# protocol header names it), or None to close the connection unanswered.
BeforeTLS = Callable[[socket.socket, str], Awaitable[str | None]]


class Acceptor:
    """Accept on ``sock``; give each connection whose handshake completes to a new protocol
    from ``protocol_factory(remote)``, and each failure to ``failed(remote, error)``. With
    ``before_tls``, each socket is first given to it (the PROXY protocol's header)."""

    def __init__(
        self,
        sock: socket.socket,
        context: ssl.SSLContext,
        protocol_factory: Callable[[str], asyncio.Protocol],
        failed: Callable[[str, OSError], None],
        before_tls: BeforeTLS | None = None,
    ) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._context = context
        self._protocol_factory = protocol_factory
        self._failed = failed
        self._before_tls = before_tls
        self._loop = asyncio.get_running_loop()
        # uvloop has a TLS protocol of its own, in C: it keeps ssl=...
        self._lean = isinstance(self._loop, selector_events.BaseSelectorEventLoop)
        # Each handshake under way, with its socket while the task has not yet taken it over.
        self._handshakes: dict[asyncio.Task[None], socket.socket | None] = {}
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False
        self._loop.add_reader(sock, self._accept)

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    def _accept(self) -> None:
        # As many as are queued (up to the backlog), then back to the loop.
        for _ in range(BACKLOG):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client left while queued
            except OSError as exc:
                # Out of descriptors or memory, above all: accepting again at once would spin.
                log.error("cannot accept a connection: %s; trying again in 1 s", exc.strerror)
                self._loop.remove_reader(self._sock)
                self._retry = self._loop.call_later(_RETRY_ACCEPT_S, self._resume)
                return
            task = self._loop.create_task(self._secure(conn))
            self._handshakes[task] = conn
            task.add_done_callback(self._done)

    def _resume(self) -> None:
        self._retry = None
        if not self._closed:
            self._loop.add_reader(self._sock, self._accept)

    async def _secure(self, conn: socket.socket) -> None:
        task = asyncio.current_task()
        assert task is not None
        try:
            peer = conn.getpeername()
        except OSError:  # reset while queued
            peer = None
        client = str(peer[0]) if peer else "-"
        if self._before_tls is not None:
            # Accepted sockets do not inherit the listener's O_NONBLOCK, and the loop's
            # sock_recv would block the whole loop on a blocking one.
            conn.setblocking(False)
            # Until connect_accepted_socket takes it, conn is still ours: _done closes it if
            # this ends here (refused, or cancelled by close()).
            named = await self._before_tls(conn, client)
            if named is None:
                return
            client = named
        self._handshakes[task] = None  # from here on the transport owns (and closes) conn
        try:
            if self._lean:
                await self._handshake(conn, client)
            else:
                await self._loop.connect_accepted_socket(
                    lambda: self._protocol_factory(client),
                    conn,
                    ssl=self._context,
                    ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S,
                )
        except OSError as exc:  # ssl.SSLError, a reset, the handshake timeout: all OSErrors
            self._failed(client, exc)

    async def _handshake(self, conn: socket.socket, client: str) -> None:
        """What ``connect_accepted_socket(ssl=...)`` does on asyncio's loop, with
        :class:`_TLSProtocol`: returns once the handshake is complete and the connection's
        protocol has it; raises as that would."""
        handshake = self._loop.create_future()
        tls = _TLSProtocol(
            self._loop,
            self._protocol_factory(client),
            self._context,
            handshake,
            server_side=True,
            ssl_handshake_timeout=int(TLS_HANDSHAKE_TIMEOUT_S),  # typeshed's int: 30 s is one
        )
        transport, _ = await self._loop.connect_accepted_socket(lambda: tls, conn)
        try:
            await handshake
        except BaseException:
            transport.abort()  # as asyncio closes a connection whose handshake did not complete
            raise

    def _done(self, task: asyncio.Task[None]) -> None:
        conn = self._handshakes.pop(task, None)
        if conn is not None:  # cancelled before it began: nobody else will close it
            conn.close()
        if not task.cancelled() and (error := task.exception()) is not None:
            # Not a failed handshake (those are OSErrors, reported above): a fault of ours.
            log.error("accepting a connection failed", exc_info=error)

    def close(self) -> None:
        """Stop accepting, close the listening socket, and abandon the handshakes under way."""
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        self._loop.remove_reader(self._sock)
        self._sock.close()
        for task in list(self._handshakes):
            task.cancel()  # connect_accepted_socket closes its transport

    async def wait_closed(self) -> None:
        """Until every abandoned handshake has ended."""
        if self._handshakes:
            await asyncio.gather(*self._handshakes, return_exceptions=True)
