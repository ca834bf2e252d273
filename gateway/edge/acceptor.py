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
reading into one buffer of 64 KiB that every connection of the acceptor shares, instead of a
256 KiB buffer asyncio allocates, zeroes and frees for each connection (a quarter of a million
instructions, about 2 % of a new connection's CPU with its handshake; 64 KiB cost 260,000 less
but still about 100,000 a connection in ``malloc_consolidate``, as freeing 64 KiB or more
triggers it). Each TLS read asks OpenSSL for up to 64 KiB, four full TLS records. The
handshake, its timeout and every check are asyncio's, as with ``ssl=...``.

On asyncio's loop, too, a connection without a PROXY header needs no task: the accepted socket
gets its transport at once, and the TLS protocol tells the acceptor how its handshake ended
(asyncio's ``connect_accepted_socket`` runs a coroutine, two futures and a task per connection
for the same, a tenth of what Python does around a handshake). A PROXY header is read first, in
a task, as before.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from asyncio import selector_events
from collections.abc import Awaitable, Callable
from typing import cast

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


READ_BUFFER_BYTES = 64 * 1024  # the TLS connections' one read buffer on asyncio's loop


class _TLSProtocol(TLSReads):
    """asyncio's TLS protocol reading into its acceptor's one read buffer without an exception
    per read (gateway.edge.tls_reads), telling ``handshake_ended(self, error)`` instead of a
    future how its handshake ended (see the module docstring)."""

    # asyncio's __init__ allocates a read buffer of max_size for each connection: none here.
    max_size = 0

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        app_protocol: asyncio.Protocol,
        context: ssl.SSLContext,
        handshake_ended: Callable[[_TLSProtocol, BaseException | None], None],
        read_buffer: memoryview,
    ) -> None:
        super().__init__(
            loop,
            app_protocol,
            context,
            None,  # type: ignore[arg-type]  # no waiter: asyncio takes None (typeshed says not)
            server_side=True,
            ssl_handshake_timeout=int(TLS_HANDSHAKE_TIMEOUT_S),  # typeshed's int: 30 s is one
        )
        self._handshake_ended: Callable[[_TLSProtocol, BaseException | None], None] | None = (
            handshake_ended
        )
        # Each read goes into the buffer and is copied at once into this connection's TLS
        # input (buffer_updated, a MemoryBIO) before the loop runs anything else: one buffer
        # serves every connection of the loop. max_size is also what one SSLObject.read() asks.
        self._ssl_buffer_view = read_buffer
        self.client = "-"  # the client's address, for the report of a failed handshake
        # The socket's transport, known before connection_made gives it (see abort).
        self.accepted: asyncio.Transport | None = None
        self.max_size = len(read_buffer)  # type: ignore[misc]  # typeshed: ClassVar; read per instance

    def get_buffer(self, n: int) -> memoryview:
        return self._ssl_buffer_view

    def _wakeup_waiter(self, exc: BaseException | None = None) -> None:
        # asyncio's one call where the handshake ends: complete (the application protocol has
        # its connection), failed, or the connection lost first; the first call only.
        ended, self._handshake_ended = self._handshake_ended, None
        if ended is None:
            return
        if exc is None and self._transport is None:
            # Lost without an error while under way: aborted (Acceptor.close) or reset.
            exc = ConnectionResetError("the connection closed during the TLS handshake")
        ended(self, exc)

    def abort(self) -> None:
        """Close the connection at once, without a word of TLS; also before connection_made
        (then the handshake never starts reading: an aborted transport adds no reader)."""
        transport = self._transport or self.accepted
        if transport is not None:
            cast(asyncio.Transport, transport).abort()


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
        self._securing: set[_TLSProtocol] = set()
        self._read_buffer = memoryview(bytearray(READ_BUFFER_BYTES))  # see _TLSProtocol
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
        :class:`_TLSProtocol` and without a task: the transport owns (and closes) ``conn``
        from here on, and :meth:`_handshake_ended` hears how the handshake ended."""
        tls = _TLSProtocol(
            self._loop,
            self._protocol_factory(client),
            self._context,
            self._handshake_ended,
            self._read_buffer,
        )
        tls.client = client
        try:
            conn.setblocking(False)
            # The transport connect_accepted_socket would make, without its waiter: it calls
            # connection_made, which starts the handshake, on the loop's next turn.
            # (A method of every selector loop since Python 3.4, absent from typeshed.) The
            # peer's address is accept()'s, rather than asked of the kernel again.
            tls.accepted = self._loop._make_socket_transport(  # type: ignore[attr-defined]
                conn, tls, extra={"peername": address}
            )
        except OSError as exc:  # reset before it began (TCP_NODELAY on a dead socket, say)
            conn.close()
            self._failed(client, exc)
            return
        self._securing.add(tls)

    def _handshake_ended(self, tls: _TLSProtocol, error: BaseException | None) -> None:
        self._securing.discard(tls)
        if self._closed and not self._securing:
            self._none_securing.set()
        if error is None:
            return  # the connection's protocol has it
        tls.abort()  # as asyncio closes a connection whose handshake did not complete
        if isinstance(error, OSError):  # ssl.SSLError, a reset, the handshake timeout
            self._failed(tls.client, error)
        else:  # not a failed handshake: a fault of ours
            log.error("accepting a connection failed", exc_info=error)

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
