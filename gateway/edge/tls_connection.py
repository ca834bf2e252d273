"""The TLS of a callback connection on asyncio's own loop: an ``ssl.SSLObject`` over two memory
buffers, driven by a plain protocol on the socket's transport.

Rule: the application protocol hears of a connection only once its handshake is complete, gets
the bytes, end of stream (the peer's ``close_notify`` or end of the TCP stream, while it has
not closed itself) and loss that asyncio's own TLS protocol gives it, and writes through this
object as through any transport; how a handshake ended goes to ``handshake_ended``
once, as an error (every one an ``OSError``: ``ssl.SSLError``, a reset, the timeout) or
``None``.

Why not asyncio's ``SSLProtocol``: it is general (a client or a server, a buffered or a plain
application protocol, renegotiation, ``start_tls`` on a live connection) and Python's share of
a new connection was mostly its machinery: a state machine checked on each step, flow-control
calls on each write, a ``do_handshake`` before any byte has arrived (an exception), a timer for
the handshake and another for the shutdown, and an exception per read that finds nothing more
to decrypt. Here only what the listener uses is kept:

- the handshake starts with the ClientHello's bytes, never before; a handshake not complete
  within its time is ended by one timer per acceptor (:mod:`gateway.edge.deadlines`), not
  one each;
- each read from the socket goes into the acceptor's one read buffer and at once into the
  connection's ``MemoryBIO``; decrypted bytes are read into that same buffer, and the reading
  stops once neither buffer holds anything (no fruitless ``SSLObject.read``);
- each write is encrypted and handed to the socket's transport in one ``write``;
- a slow reader: while the socket's transport holds more than its high-water mark of unsent
  bytes, the socket is not read either (TLS itself answers some records with records of its
  own), and the application is told (``pause_writing``), so nothing grows without bound. The
  socket's unsent bytes are all a connection holds (nothing stays in the ``SSLObject``'s
  outgoing buffer past a call), so they are its write buffer's size: at most the mark plus one
  answer. (asyncio's own protocol keeps up to 512 KiB of its own while the socket's transport
  holds its 64 KiB, and then hands it all over at once; its write buffer's size counts only
  its own.)
- closing sends ``close_notify`` and waits (at most :data:`SHUTDOWN_TIMEOUT_S`) for the peer's,
  or its end of stream, before closing the socket, so that bytes the peer still sends do not
  turn the close into a reset that could cost it the last answer;
- a failed handshake sends OpenSSL's alert, so that the client learns why, then closes.
"""

from __future__ import annotations

import asyncio
import enum
import ssl
from collections.abc import Callable
from typing import Any

from gateway.edge.deadlines import Deadlines
from gateway.units import SECONDS

__all__ = ["SHUTDOWN_TIMEOUT_S", "TLSConnection"]

SHUTDOWN_TIMEOUT_S = 30 * SECONDS  # the peer's close_notify, awaited at most (asyncio's too)


class _State(enum.Enum):
    HANDSHAKE = "shaking hands"
    OPEN = "open"
    SHUTDOWN = "close_notify sent, the peer's awaited"
    CLOSED = "closed"


class TLSConnection(asyncio.BufferedProtocol, asyncio.Transport):
    """The socket transport's protocol, and the application protocol's transport."""

    __slots__ = (
        "_app",
        "_app_paused",
        "_buffer",
        "_connected",
        "_context",
        "_deadlines",
        "_error",
        "_handshake_ended",
        "_handshake_timeout_s",
        "_incoming",
        "_outgoing",
        "_send_paused",
        "_sslobj",
        "_state",
        "_transport",
        "accepted",
        "client",
    )

    def __init__(
        self,
        context: ssl.SSLContext,
        app: asyncio.Protocol,
        handshake_ended: Callable[[TLSConnection, OSError | None], None],
        read_buffer: memoryview,
        deadlines: Deadlines,
        handshake_timeout_s: float,
    ) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._sslobj = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._context = context
        self._app = app
        self._handshake_ended: Callable[[TLSConnection, OSError | None], None] | None = (
            handshake_ended
        )
        # Each socket read lands here and is copied into _incoming before anything else runs;
        # decrypted bytes are then read into it too: one buffer serves every connection.
        self._buffer = read_buffer
        self._deadlines = deadlines
        self._handshake_timeout_s = handshake_timeout_s
        self._state = _State.HANDSHAKE
        self._connected = False  # the application protocol has its connection
        self._transport: asyncio.Transport | None = None
        self._app_paused = False  # the application asked not to read
        self._send_paused = False  # the socket's transport holds too much unsent
        self._error: BaseException | None = None  # why it was aborted, for connection_lost
        self.client = "-"  # the client's address, for the report of a failed handshake
        # The socket's transport, known before connection_made gives it (see abort).
        self.accepted: asyncio.Transport | None = None

    # -- the socket's side ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a selector socket transport
        if self._state is _State.HANDSHAKE:
            # Nothing to do until the ClientHello arrives: a server speaks second.
            self._deadlines.set(self, self._handshake_timeout_s)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self._incoming.write(self._buffer[:nbytes])
        state = self._state
        if state is _State.OPEN:
            self._read()
        elif state is _State.HANDSHAKE:
            self._handshake()
        elif state is _State.SHUTDOWN:
            self._shutdown()

    def eof_received(self) -> bool | None:
        # The peer's end of stream without close_notify (or after ours): nothing more can be
        # read or answered. The socket's transport closes itself once this returns.
        state = self._state
        if state is _State.HANDSHAKE:
            self._end_handshake(
                ConnectionResetError("the connection closed during the TLS handshake")
            )
        elif state is _State.OPEN:
            self._state = _State.CLOSED
            self._app.eof_received()
        else:
            self._state = _State.CLOSED
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadlines.clear(self)
        if self._handshake_ended is not None:
            self._state = _State.CLOSED
            lost = exc or self._error
            self._end_handshake(
                lost
                if isinstance(lost, OSError)
                else ConnectionResetError("the connection closed during the TLS handshake")
            )
            return
        self._state = _State.CLOSED
        self._transport = None
        if self._connected:
            self._connected = False
            self._app.connection_lost(exc or self._error)  # type: ignore[arg-type]

    def pause_writing(self) -> None:
        self._send_paused = True
        if not self._app_paused and self._transport is not None:
            self._transport.pause_reading()
        if self._connected:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        self._send_paused = False
        if not self._app_paused and self._transport is not None:
            self._transport.resume_reading()
        if self._connected:
            self._app.resume_writing()

    def expired(self) -> None:
        """The deadline set for the handshake or the shutdown passed
        (:class:`~gateway.edge.deadlines.Deadlines`)."""
        if self._state is _State.HANDSHAKE:
            self._end_handshake(
                ConnectionAbortedError(
                    f"TLS handshake not complete within {self._handshake_timeout_s:g} s"
                )
            )
        elif self._state is _State.SHUTDOWN:
            self.abort()

    # -- the handshake ----------------------------------------------------------------------

    def _handshake(self) -> None:
        sslobj = self._sslobj
        try:
            sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()  # the server's flight, once the ClientHello is in
            return
        except ssl.SSLError as exc:
            self._end_handshake(exc)
            return
        self._deadlines.clear(self)
        self._state = _State.OPEN
        self._flush()  # session tickets, where the context sends them
        ended, self._handshake_ended = self._handshake_ended, None
        assert ended is not None
        ended(self, None)
        self._connected = True
        self._app.connection_made(self)
        # A request sent with the client's last flight is in the same read.
        if self._state is _State.OPEN and (self._incoming.pending or sslobj.pending()):
            self._read()

    def _end_handshake(self, error: OSError) -> None:
        """The handshake failed: OpenSSL's alert, if it made one, goes out, then the socket
        closes; the acceptor hears why."""
        self._deadlines.clear(self)
        self._state = _State.CLOSED
        transport = self._transport or self.accepted
        if transport is not None and not transport.is_closing():
            if isinstance(error, ssl.SSLError):
                self._flush()
                transport.close()
            else:
                transport.abort()
        ended, self._handshake_ended = self._handshake_ended, None
        if ended is not None:
            ended(self, error)

    # -- reading ----------------------------------------------------------------------------

    def _read(self) -> None:
        sslobj = self._sslobj
        incoming = self._incoming
        buffer = self._buffer
        size = len(buffer)
        chunks: list[bytes] = []
        closed = False
        try:
            while True:
                # Into the read buffer, whose bytes are in _incoming by now: no allocation of
                # a whole buffer's size per read.
                # (typeshed says bytes and a bytearray: given a buffer, it fills any writable
                # one and returns how much it wrote.)
                count: int = sslobj.read(size, buffer)  # type: ignore[assignment]
                if not count:
                    closed = True  # the peer's close_notify
                    break
                chunks.append(buffer[:count].tobytes())
                if not incoming.pending and not sslobj.pending():
                    break
        except ssl.SSLWantReadError:
            pass  # a record cut short by the end of the read: the rest comes with the next
        except ssl.SSLError as exc:
            self._fail(exc)
            return
        if self._outgoing.pending:
            self._flush()  # TLS's own answers to what was read (a key update, say)
        if chunks:
            self._app.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if closed and self._state is _State.OPEN:
            self._app.eof_received()
            self.close()

    # -- the application's transport --------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._state is not _State.OPEN or not data:
            return  # closing or closed: as asyncio's, what is written then is dropped
        try:
            self._sslobj.write(data)
        except ssl.SSLError as exc:
            self._fail(exc)
            return
        self._flush()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False  # TLS has close_notify instead (close)

    def write_eof(self) -> None:
        raise NotImplementedError("a TLS connection closes with close_notify: close() it")

    def close(self) -> None:
        """Send close_notify, then close the socket once the peer has answered with its own
        or its end of stream (or after :data:`SHUTDOWN_TIMEOUT_S`)."""
        if self._state is not _State.OPEN:
            if self._state is _State.HANDSHAKE:
                self.abort()
            return
        self._state = _State.SHUTDOWN
        self._shutdown()
        if self._state is _State.SHUTDOWN:
            self._deadlines.set(self, SHUTDOWN_TIMEOUT_S)

    def _shutdown(self) -> None:
        try:
            self._sslobj.unwrap()
        except ssl.SSLWantReadError:
            self._flush()  # ours is sent; the peer's is awaited
            return
        except ssl.SSLError:
            self.abort()
            return
        self._flush()
        self._state = _State.CLOSED
        self._deadlines.clear(self)
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Close at once, without a word of TLS; also before connection_made."""
        # During the handshake, connection_lost reports it as reset.
        self._state = _State.CLOSED
        self._deadlines.clear(self)
        transport = self._transport or self.accepted
        if transport is not None:
            transport.abort()

    def is_closing(self) -> bool:
        return self._state is not _State.OPEN

    def pause_reading(self) -> None:
        if not self._app_paused:
            self._app_paused = True
            if not self._send_paused and self._transport is not None:
                self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._app_paused:
            self._app_paused = False
            if not self._send_paused and self._transport is not None:
                self._transport.resume_reading()

    def is_reading(self) -> bool:
        return not self._app_paused and self._state is _State.OPEN

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._transport is not None:
            self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        # Everything this connection holds unsent: _flush leaves nothing in _outgoing.
        return 0 if self._transport is None else self._transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, 0) if self._transport is None else self._transport.get_write_buffer_limits()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._app = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._app

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        # Made when asked, not at each handshake: the listener asks for the SSL object alone.
        if self._handshake_ended is None:
            if name == "ssl_object":
                return self._sslobj
            if name == "peercert":
                return self._sslobj.getpeercert()
            if name == "cipher":
                return self._sslobj.cipher()
            if name == "compression":
                return self._sslobj.compression()
        if name == "sslcontext":
            return self._context
        transport = self._transport or self.accepted
        return default if transport is None else transport.get_extra_info(name, default)

    # -- between both sides -----------------------------------------------------------------

    def _flush(self) -> None:
        data = self._outgoing.read()
        if data and self._transport is not None:
            self._transport.write(data)

    def _fail(self, error: BaseException) -> None:
        """A TLS error on an established connection (a bad record, say): closed at once."""
        self._error = error
        self.abort()
