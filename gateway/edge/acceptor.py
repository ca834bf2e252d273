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

On asyncio's own loop the TLS is the gateway's own (:mod:`gateway.edge.tls_connection`): a plain
protocol on the accepted socket's transport drives an ``ssl.SSLObject``, with no task, coroutine
or future per connection (asyncio's ``connect_accepted_socket`` runs a coroutine, two futures
and a task for the same), every connection reading into one buffer of 64 KiB the acceptor
shares (asyncio allocates, zeroes and frees 256 KiB for each), and one timer for every
handshake's timeout instead of one each. A PROXY header is read first, in a task, as before.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from asyncio import selector_events
from collections.abc import Awaitable, Callable

from gateway.edge.deadlines import Deadlines
from gateway.edge.tls_connection import TLSConnection
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
            # "::" (every IPv6 interface) takes IPv4 as well, as IPv4-mapped addresses (RFC
            # 4291 section 2.5.5.2): there is one listen.host, so an IPv6-only "::" would
            # leave no way to serve both, and Meta may connect over either. Any other IPv6
            # address is its own family's alone, whatever the system's default is.
            dual = ipaddress.ip_address(str(address[0]).split("%")[0]).is_unspecified
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual else 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


READ_BUFFER_BYTES = 64 * 1024  # the TLS connections' one read buffer on asyncio's loop


# Before the handshake, given the accepted socket and its peer: the client's address (a PROXY
# protocol header names it), or None to close the connection unanswered.
BeforeTLS = Callable[[socket.socket, str], Awaitable[str | None]]


def _host(address: object) -> str:
    """The client's address as ``accept()`` gave it (host, port, ...): its host, or "-"."""
    return str(address[0]) if isinstance(address, tuple) and address else "-"


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
        # Each handshake under way in a task (after a PROXY header, or on uvloop), with its
        # socket while the task has not yet handed it over; and each one without a task.
        self._handshakes: dict[asyncio.Task[None], socket.socket | None] = {}
        self._securing: set[TLSConnection] = set()
        self._read_buffer = memoryview(bytearray(READ_BUFFER_BYTES))  # see TLSConnection
        self._deadlines = Deadlines(self._loop)
        self._none_securing = asyncio.Event()  # set when closed and the last of those ended
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
                conn, address = self._sock.accept()
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
            if self._lean and self._before_tls is None:
                self._start_tls(conn, _host(address), address)
                continue
            task = self._loop.create_task(self._secure(conn, address))
            self._handshakes[task] = conn
            task.add_done_callback(self._done)

    def _resume(self) -> None:
        self._retry = None
        if not self._closed:
            self._loop.add_reader(self._sock, self._accept)

    async def _secure(self, conn: socket.socket, address: object) -> None:
        task = asyncio.current_task()
        assert task is not None
        client = _host(address)
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
        if self._lean:
            self._start_tls(conn, client, address)
            return
        try:
            await self._loop.connect_accepted_socket(
                lambda: self._protocol_factory(client),
                conn,
                ssl=self._context,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S,
            )
        except OSError as exc:  # ssl.SSLError, a reset, the handshake timeout: all OSErrors
            self._failed(client, exc)

    def _start_tls(self, conn: socket.socket, client: str, address: object) -> None:
        """What ``connect_accepted_socket(ssl=...)`` does on asyncio's loop, with
        :class:`TLSConnection` and without a task: the transport owns (and closes) ``conn``
        from here on, and :meth:`_handshake_ended` hears how the handshake ended."""
        tls = TLSConnection(
            self._context,
            self._protocol_factory(client),
            self._handshake_ended,
            self._read_buffer,
            self._deadlines,
            TLS_HANDSHAKE_TIMEOUT_S,
        )
        tls.client = client
        try:
            conn.setblocking(False)
            # The transport connect_accepted_socket would make, without its waiter: it calls
            # connection_made on the loop's next turn. (A method of every selector loop since
            # Python 3.4, absent from typeshed.) The peer's address is accept()'s, rather than
            # asked of the kernel again.
            tls.accepted = self._loop._make_socket_transport(  # type: ignore[attr-defined]
                conn, tls, extra={"peername": address}
            )
        except OSError as exc:  # reset before it began (TCP_NODELAY on a dead socket, say)
            conn.close()
            self._failed(client, exc)
            return
        self._securing.add(tls)

    def _handshake_ended(self, tls: TLSConnection, error: OSError | None) -> None:
        # The connection has closed itself if it failed (after OpenSSL's alert, if any).
        self._securing.discard(tls)
        if self._closed and not self._securing:
            self._none_securing.set()
        if error is not None:  # ssl.SSLError, a reset, the handshake timeout
            self._failed(tls.client, error)

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
        for tls in list(self._securing):
            tls.abort()  # its handshake ends, aborted, on the loop's next turn

    async def wait_closed(self) -> None:
        """Until every abandoned handshake has ended."""
        if self._handshakes:
            await asyncio.gather(*self._handshakes, return_exceptions=True)
        if self._securing:  # each ends at the latest when its aborted transport is lost
            await self._none_securing.wait()
