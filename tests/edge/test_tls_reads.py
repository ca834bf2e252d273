"""Reads of established TLS connections on asyncio's loop (gateway.edge.tls_connection): the same
bytes and end of stream as asyncio's own protocol, without a fruitless read into OpenSSL each."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from memory_tls import handshake
from pki import Pki

from gateway.edge.acceptor import Acceptor, bind

MESSAGE = b"x" * 1500  # about one notification: one TLS record


class _CountingSSLObject(ssl.SSLObject):
    """The server's ``SSLObject`` (``SSLContext.sslobject_class``), counting reads that found
    nothing to decrypt once the handshake was done."""

    fruitless = 0

    def read(self, len: int = 1024, buffer: Any = None) -> Any:
        try:
            return super().read(len, buffer) if buffer is not None else super().read(len)
        except ssl.SSLWantReadError:
            type(self).fruitless += 1
            raise


class _Received(asyncio.Protocol):
    """What the application sees: the bytes, each read's size, the end of stream; answers one
    byte per MESSAGE, so that a client can send the next only once this one is in."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.reads: list[int] = []
        self.eof = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        before = len(self.data) // len(MESSAGE)
        self.data += data
        self.reads.append(len(data))
        assert self.transport is not None
        self.transport.write(b"k" * (len(self.data) // len(MESSAGE) - before))

    def eof_received(self) -> None:
        if not self.eof.done():
            self.eof.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.eof.done():
            self.eof.set_result(None)


class _Server:
    def __init__(self, acceptor: Acceptor) -> None:
        self.acceptor = acceptor
        self.connections: list[_Received] = []


@pytest.fixture
async def server(pki: Pki) -> AsyncIterator[_Server]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_chain_file, pki.server_key_file)
    context.sslobject_class = _CountingSSLObject
    _CountingSSLObject.fruitless = 0
    made: list[_Received] = []

    def factory(remote: str) -> asyncio.Protocol:
        made.append(_Received())
        return made[-1]

    def failed(remote: str, exc: OSError) -> None:
        raise AssertionError(f"handshake failed: {exc}")

    acceptor = Acceptor(bind("127.0.0.1", 0), context, factory, failed)
    server = _Server(acceptor)
    server.connections = made
    yield server
    acceptor.close()
    await acceptor.wait_closed()


def _client(pki: Pki) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=pki.server_ca_file)
    return context


async def test_a_keep_alive_read_of_whole_records_makes_no_fruitless_read(
    server: _Server, pki: Pki
) -> None:
    """Twenty requests, one record each, one at a time: each read hands its bytes over without
    a further read into OpenSSL that could only want more (asyncio's own protocol makes one
    per read, raising and catching SSLWantReadError)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", server.acceptor.port, ssl=_client(pki), server_hostname="localhost"
    )
    try:
        await asyncio.sleep(0.05)  # past the reads that follow the handshake
        before = _CountingSSLObject.fruitless
        for _ in range(20):
            writer.write(MESSAGE)
            assert await asyncio.wait_for(reader.readexactly(1), 5) == b"k"
        fruitless = _CountingSSLObject.fruitless - before
    finally:
        writer.close()
    (received,) = server.connections
    assert bytes(received.data) == MESSAGE * 20
    assert fruitless == 0


def _records_cut_every_way(port: int, context: ssl.SSLContext) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        tls, _, outgoing = handshake(sock, context)
        # Two records in one write: one read of the server's holds both.
        tls.write(MESSAGE)
        tls.write(MESSAGE)
        sock.sendall(outgoing.read())
        time.sleep(0.05)
        # One record in two writes: the first read ends inside it.
        tls.write(MESSAGE)
        record = outgoing.read()
        sock.sendall(record[:100])
        time.sleep(0.05)
        sock.sendall(record[100:])
        time.sleep(0.05)
        # The last record and close_notify in one write.
        tls.write(MESSAGE)
        # close_notify is written; the server's is not awaited.
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.unwrap()
        sock.sendall(outgoing.read())
        time.sleep(0.2)


async def test_records_together_cut_in_two_or_followed_by_close_notify_arrive_whole(
    server: _Server, pki: Pki
) -> None:
    """Two records in one read, a record split across two reads, and a record with the
    peer's close_notify behind it in one read: every byte reaches the application in order,
    and the end of stream after the last."""
    await asyncio.to_thread(_records_cut_every_way, server.acceptor.port, _client(pki))
    (received,) = server.connections
    await asyncio.wait_for(received.eof, 5)
    assert bytes(received.data) == MESSAGE * 4
