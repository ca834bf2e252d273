"""The TLS handshake of new callback connections, on both event loops the gateway runs on.

The gateway serves on uvloop when it is installed (the ``speed`` extra) and on asyncio's own
loop otherwise; these tests run a real gateway on each, with a blocking client socket.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlencode

import pytest
import uvloop
from helpers import VERIFY_TOKEN, gateway_config
from pki import Pki

from gateway.edge import acceptor
from gateway.edge.acceptor import Acceptor, bind
from gateway.edge.tls import build_server_context
from gateway.runtime.gateway import Gateway

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
QUERY = urlencode(
    {"hub.mode": "subscribe", "hub.challenge": "4242", "hub.verify_token": VERIFY_TOKEN}
)
REQUEST = f"GET /webhook?{QUERY} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
CLIENT_TIMEOUT_S = 5.0


def _verify(port: int, context: ssl.SSLContext) -> bytes:
    """Connect, shake hands, send Meta's verification GET; the raw answer."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT_S) as sock,
        context.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        tls.sendall(REQUEST)
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk
        return answer


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_client_hello_waiting_before_the_gateway_accepts_is_answered_at_once(
    pki: Pki, tmp_path: Path, loop_name: str
) -> None:
    """A client whose connection and ClientHello are both waiting when a busy gateway gets to
    accept it completes its handshake and is answered, instead of waiting out the handshake
    timeout (uvloop reads a new connection as soon as it is accepted)."""

    async def scenario() -> bytes:
        async with Gateway(gateway_config(pki, tmp_path, admin=False)) as gateway:
            loop = asyncio.get_running_loop()
            answer = loop.run_in_executor(None, _verify, gateway.port, pki.client_context("meta"))
            # The event loop is busy: the kernel completes the TCP handshake and queues the
            # ClientHello before the gateway accepts.
            time.sleep(0.5)  # noqa: ASYNC251  (blocking the loop is the point)
            return await asyncio.wait_for(answer, CLIENT_TIMEOUT_S * 2)

    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        answer = runner.run(scenario())
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b"\r\n\r\n4242")


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_handshake_cut_short_by_shutdown_is_not_counted_as_the_clients_failure(
    pki: Pki, tmp_path: Path, loop_name: str
) -> None:
    """A connection still in its handshake when the gateway stops is closed by the gateway:
    no failure is counted or logged against the client."""

    async def scenario() -> str:
        async with Gateway(gateway_config(pki, tmp_path, admin=False)) as gateway:
            _, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            await asyncio.sleep(0.2)  # accepted, waiting for a ClientHello that never comes
        writer.close()
        return gateway.stats.render().decode()

    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        text = runner.run(scenario())
    assert "waba_gateway_tls_handshake_failures_total{" not in text


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_handshake_that_never_completes_ends_at_its_timeout_counted_as_timeout(
    pki: Pki, tmp_path: Path, loop_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that connects and never sends its ClientHello is closed at the handshake
    timeout, and the failure is counted as ``timeout``; the gateway still serves."""
    monkeypatch.setattr(acceptor, "TLS_HANDSHAKE_TIMEOUT_S", 1.0)

    async def scenario() -> tuple[bytes, str, bytes]:
        async with Gateway(gateway_config(pki, tmp_path, admin=False)) as gateway:
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            async with asyncio.timeout(CLIENT_TIMEOUT_S):
                closed = await reader.read()  # the gateway's end of it: EOF, nothing sent
            writer.close()
            loop = asyncio.get_running_loop()
            answer = await loop.run_in_executor(
                None, _verify, gateway.port, pki.client_context("meta")
            )
            return closed, gateway.stats.render().decode(), answer

    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        closed, text, answer = runner.run(scenario())
    assert closed == b""
    assert 'waba_gateway_tls_handshake_failures_total{reason="timeout"} 1' in text
    assert answer.endswith(b"\r\n\r\n4242")


def test_closing_as_a_connection_is_accepted_ends_its_handshake_at_once(pki: Pki) -> None:
    """A connection accepted just before the listener closes, whose handshake has not yet
    started, is aborted with the others: closing does not wait out its handshake timeout."""

    async def scenario() -> list[OSError]:
        loop = asyncio.get_running_loop()
        failures: list[OSError] = []
        context = build_server_context(pki.tls_config())
        closed = asyncio.Event()

        def connection(remote: str) -> asyncio.Protocol:
            # Runs as the connection is accepted: the close comes before its handshake starts.
            loop.call_soon(server.close)
            loop.call_soon(closed.set)
            return asyncio.Protocol()

        server = Acceptor(
            bind("127.0.0.1", 0), context, connection, lambda _, exc: failures.append(exc)
        )
        with socket.create_connection(("127.0.0.1", server.port)):
            async with asyncio.timeout(CLIENT_TIMEOUT_S):
                await closed.wait()
                await server.wait_closed()
        return failures

    with asyncio.Runner(loop_factory=LOOPS["asyncio"]) as runner:
        failures = runner.run(scenario())
    assert [type(exc) for exc in failures] == [ConnectionResetError]
