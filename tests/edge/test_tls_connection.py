"""The gateway's own TLS on asyncio's loop (gateway.edge.tls_connection), through a real
acceptor and real sockets: how connections end, a peer that does not read, the handshake's
timeout and its cut-short ends, records cut anywhere."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Callable

import pytest
from pki import Pki

from gateway.edge import acceptor
from gateway.edge.acceptor import Acceptor, bind

MESSAGE = b"x" * 1500
# A sender that has made no progress for this long is held back by the server (a loaded
# machine may leave the server unscheduled for a good part of a second).
STALLED_S = 2.0
CLIENT_TIMEOUT_S = 5.0


class _App(asyncio.Protocol):
    """The application's side: records what it is told; ``on_data`` answers each read."""

    def __init__(self, on_data: Callable[[_App, bytes], None] | None = None) -> None:
        self.data = bytearray()
        self.transport: asyncio.Transport | None = None
        self.events: list[str] = []
        self.lost = asyncio.get_running_loop().create_future()
        self._on_data = on_data

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.events.append("made")

    def data_received(self, data: bytes) -> None:
        self.data += data
        if self._on_data is not None:
            self._on_data(self, data)

    def eof_received(self) -> None:
        self.events.append("eof")

    def pause_writing(self) -> None:
        self.events.append("pause_writing")

    def resume_writing(self) -> None:
        self.events.append("resume_writing")

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        if not self.lost.done():
            self.lost.set_result(exc)


class _Server:
    def __init__(self, context: ssl.SSLContext) -> None:
        self.apps: list[_App] = []
        self.failures: list[OSError] = []
        self.on_data: Callable[[_App, bytes], None] | None = None
        self.acceptor = Acceptor(
            bind("127.0.0.1", 0),
            context,
            self._app,
            self._failed,
        )
        self.failed = asyncio.Event()  # set at each failure

    def _failed(self, remote: str, error: OSError) -> None:
        self.failures.append(error)
        self.failed.set()

    async def failed_handshakes(self, count: int) -> list[OSError]:
        """The failures, once there are ``count`` of them."""
        async with asyncio.timeout(CLIENT_TIMEOUT_S):
            while len(self.failures) < count:
                await self.failed.wait()
                self.failed.clear()
        return self.failures

    def _app(self, remote: str) -> asyncio.Protocol:
        self.apps.append(_App(self.on_data))
        return self.apps[-1]

    @property
    def port(self) -> int:
        return self.acceptor.port


@pytest.fixture
async def server(pki: Pki) -> AsyncIterator[_Server]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_chain_file, pki.server_key_file)
    made = _Server(context)
    yield made
    made.acceptor.close()
    await made.acceptor.wait_closed()


def _client(pki: Pki) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=pki.server_ca_file)
    return context


class _Client:
    """A blocking client whose TLS records are made in memory, so that a test decides how
    they are cut into the socket's writes and when anything is read."""

    def __init__(self, port: int, context: ssl.SSLContext, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(CLIENT_TIMEOUT_S)
        self.sock.connect(("127.0.0.1", port))
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")

    def handshake(self, *, send_last_flight: bool = True) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.sock.sendall(self.outgoing.read())
                self.incoming.write(self.sock.recv(65536))
        if send_last_flight:
            self.sock.sendall(self.outgoing.read())

    def read_until_closed(self) -> tuple[bytes, bool]:
        """Everything the server sends until its close_notify (True) or its end of stream
        without one (False)."""
        data = b""
        while True:
            try:
                chunk = self.tls.read(65536)
            except ssl.SSLZeroReturnError:
                return data, True  # close_notify, after ours
            except ssl.SSLWantReadError:
                received = self.sock.recv(65536)
                if not received:
                    return data, False
                self.incoming.write(received)
                continue
            if not chunk:
                return data, True
            data += chunk

    def close(self) -> None:
        self.sock.close()


def _send(client: _Client, data: bytes) -> None:
    client.tls.write(data)
    client.sock.sendall(client.outgoing.read())


async def test_closing_sends_close_notify_and_closes_once_the_peer_answers(
    server: _Server, pki: Pki
) -> None:
    """The application's close() goes out as close_notify after its last answer; the socket
    closes once the peer answers with its own, and the application hears of the loss."""

    def answer_and_close(app: _App, data: bytes) -> None:
        assert app.transport is not None
        app.transport.write(b"bye")
        app.transport.close()
        assert app.transport.is_closing()

    server.on_data = answer_and_close

    def client() -> tuple[bytes, bool, bytes]:
        tls = _Client(server.port, _client(pki))
        try:
            tls.handshake()
            _send(tls, MESSAGE)
            answer, notified = tls.read_until_closed()
            tls.tls.unwrap()  # the server's close_notify is in: ours goes out at once
            tls.sock.sendall(tls.outgoing.read())
            return answer, notified, tls.sock.recv(1)
        finally:
            tls.close()

    answer, notified, after = await asyncio.to_thread(client)
    assert (answer, notified, after) == (b"bye", True, b"")
    app = server.apps[0]
    assert await asyncio.wait_for(app.lost, CLIENT_TIMEOUT_S) is None
    assert app.events == ["made", "lost"]


async def test_the_peers_close_notify_is_the_end_of_stream_and_is_answered(
    server: _Server, pki: Pki
) -> None:
    """A peer's close_notify after its last bytes: the application gets the bytes, then the
    end of stream; the server answers with its own close_notify and closes."""

    def client() -> tuple[bytes, bool]:
        tls = _Client(server.port, _client(pki))
        try:
            tls.handshake()
            tls.tls.write(MESSAGE)
            with contextlib.suppress(ssl.SSLWantReadError):
                tls.tls.unwrap()  # ours is written; the server's comes back
            tls.sock.sendall(tls.outgoing.read())  # the last record and close_notify together
            return tls.read_until_closed()
        finally:
            tls.close()

    assert await asyncio.to_thread(client) == (b"", True)
    app = server.apps[0]
    await asyncio.wait_for(app.lost, CLIENT_TIMEOUT_S)
    assert bytes(app.data) == MESSAGE
    assert app.events == ["made", "eof", "lost"]


async def test_an_end_of_stream_without_close_notify_ends_the_connection(
    server: _Server, pki: Pki
) -> None:
    """A peer that shuts its side down without close_notify: the application gets what came
    before, the end of stream and the loss."""

    def client() -> tuple[bytes, bool]:
        tls = _Client(server.port, _client(pki))
        try:
            tls.handshake()
            _send(tls, MESSAGE)
            tls.sock.shutdown(socket.SHUT_WR)
            return tls.read_until_closed()
        finally:
            tls.close()

    assert await asyncio.to_thread(client) == (b"", False)  # closed without a word
    app = server.apps[0]
    await asyncio.wait_for(app.lost, CLIENT_TIMEOUT_S)
    assert bytes(app.data) == MESSAGE
    assert app.events == ["made", "eof", "lost"]


async def test_a_request_sent_with_the_handshakes_last_flight_is_read_at_once(
    server: _Server, pki: Pki
) -> None:
    """The client's Finished and its first record in one write: the application gets its
    connection, then the bytes, from that one read."""

    def client() -> None:
        tls = _Client(server.port, _client(pki))
        try:
            tls.handshake(send_last_flight=False)
            _send(tls, MESSAGE)  # the last flight is still in outgoing: both go together
            time.sleep(0.2)
        finally:
            tls.close()

    await asyncio.to_thread(client)
    app = server.apps[0]
    assert bytes(app.data) == MESSAGE
    assert app.events[0] == "made"


async def test_a_record_cut_into_many_reads_arrives_whole(server: _Server, pki: Pki) -> None:
    """One 16 KiB record sent in pieces of 500 bytes, each a read of its own: the application
    gets it once, whole, when its last piece is in."""
    record = bytes(range(256)) * 64

    def client() -> None:
        tls = _Client(server.port, _client(pki))
        try:
            tls.handshake()
            tls.tls.write(record)
            encrypted = tls.outgoing.read()
            for start in range(0, len(encrypted), 500):
                tls.sock.sendall(encrypted[start : start + 500])
                time.sleep(0.005)
            time.sleep(0.2)
        finally:
            tls.close()

    await asyncio.to_thread(client)
    app = server.apps[0]
    assert bytes(app.data) == record


async def test_a_peer_that_does_not_read_stops_being_read(server: _Server, pki: Pki) -> None:
    """A client that sends without reading what it is answered: once the socket's transport
    holds more than its high-water mark of unsent answers, the connection stops reading, even
    for an application that writes on regardless, so what the server holds, seen after every
    write, stays within the mark plus the answer to one read."""

    def echo(app: _App, data: bytes) -> None:
        assert app.transport is not None
        sock = app.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        app.transport.write(data)  # pause_writing or not
        buffered.append(app.transport.get_write_buffer_size())
        limits.append(app.transport.get_write_buffer_limits()[1])

    buffered: list[int] = []
    limits: list[int] = []
    server.on_data = echo
    offered = 16 * 1024 * 1024

    def client() -> int:
        tls = _Client(server.port, _client(pki), rcvbuf=32 * 1024)
        try:
            tls.handshake()
            tls.sock.setblocking(False)
            chunk = b"y" * 16384
            sent = 0
            pending = b""
            stalled_since = time.monotonic()
            while sent < offered and time.monotonic() - stalled_since < STALLED_S:
                if not pending:
                    tls.tls.write(chunk)
                    pending = tls.outgoing.read()
                try:
                    count = tls.sock.send(pending)
                except BlockingIOError:
                    time.sleep(0.01)
                    continue
                pending = pending[count:]
                sent += count
                stalled_since = time.monotonic()
            return sent
        finally:
            tls.close()

    sent = await asyncio.to_thread(client)
    app = server.apps[0]
    assert "pause_writing" in app.events
    assert sent < offered
    assert len(app.data) < 2 * 1024 * 1024
    # One read is at most the acceptor's read buffer, plus a record the read before left cut.
    one_read = acceptor.READ_BUFFER_BYTES + 16 * 1024 + 256
    assert max(buffered) <= max(limits) + one_read


async def test_handshakes_not_complete_in_time_end_as_timeouts_and_others_go_on(
    server: _Server, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three connections that never send a ClientHello are closed at the handshake timeout,
    each reported as ConnectionAbortedError; a connection whose handshake completed within
    its time is not ended by it."""
    monkeypatch.setattr(acceptor, "TLS_HANDSHAKE_TIMEOUT_S", 0.5)
    silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]

    def client() -> bytes:
        tls = _Client(server.port, _client(pki))
        try:
            tls.handshake()
            time.sleep(1.0)  # past the timeout
            _send(tls, MESSAGE)
            time.sleep(0.1)
            return b"sent"
        finally:
            tls.close()

    assert await asyncio.to_thread(client) == b"sent"
    failures = await server.failed_handshakes(3)
    assert [type(error) for error in failures] == [ConnectionAbortedError] * 3
    for sock in silent:
        sock.settimeout(CLIENT_TIMEOUT_S)
        assert sock.recv(1) == b""  # closed by the server
        sock.close()
    (completed,) = [app for app in server.apps if app.transport is not None]
    assert bytes(completed.data) == MESSAGE


async def test_a_peer_reset_during_the_handshake_is_reported_as_a_reset(
    server: _Server, pki: Pki
) -> None:
    """A client that sends its ClientHello and then resets the connection: the handshake is
    reported failed with ConnectionResetError, and the next client is served."""

    def reset() -> None:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=CLIENT_TIMEOUT_S)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = _client(pki).wrap_bio(incoming, outgoing, server_hostname="localhost")
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())  # the ClientHello
        sock.recv(65536)  # the server's flight: it is under way
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST

    await asyncio.to_thread(reset)
    failures = await server.failed_handshakes(1)
    assert [type(error) for error in failures] == [ConnectionResetError]

    def served() -> bytes:
        tls = _Client(server.port, _client(pki))
        try:
            tls.handshake()
            _send(tls, MESSAGE)
            time.sleep(0.1)
            return b"ok"
        finally:
            tls.close()

    assert await asyncio.to_thread(served) == b"ok"
    assert bytes(server.apps[-1].data) == MESSAGE
