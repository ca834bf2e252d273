"""``listen.proxy_protocol``: the client's address from a TCP load balancer's PROXY header (v2,
or the v1 text line).

Real sockets throughout. A blocking client writes the header and drives its TLS handshake by
hand (``ssl.MemoryBIO``), so it can put the header and the ClientHello in one segment or send
the header a byte at a time; and real HAProxy (Debian's ``haproxy``) in TCP mode, with
``send-proxy-v2`` and TLS passthrough, stands in front of the gateway as it would in production.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from config_files import listen_port, write_config
from helpers import eventually, gateway_config, message_body, meta_signature, metric
from loopback_ports import free_port
from memory_tls import feed, handshake
from pki import ClientKind, Pki
from processes import serving, stop
from sink import DEADLINE_S, Sink
from test_proxy_protocol import (
    IPV4,
    IPV6,
    LOCAL,
    UNSPEC,
    V1_LONGEST,
    V1_TCP4,
    V1_TCP6,
    V1_UNKNOWN,
    inet,
    v2,
)

from gateway.onboarding.check import report
from gateway.runtime.gateway import Gateway

PATH = "/webhook"


def _request() -> bytes:
    body = message_body("through the balancer")
    return (
        f"POST {PATH} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"X-Hub-Signature-256: {meta_signature(body)}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body


def exchange(
    port: int,
    context: ssl.SSLContext,
    *,
    header: bytes = b"",
    split_header: bool = False,
    source: str | None = None,
) -> bytes:
    """Send ``header``, then one POST over TLS on the same TCP connection; the raw answer.

    Unless ``split_header``, the header and the ClientHello leave in one write, so the gateway
    must stop reading exactly at the header's end. Raises OSError (ssl.SSLError included) if
    the connection is refused."""
    with socket.create_connection(
        ("127.0.0.1", port), timeout=10, source_address=(source, 0) if source else None
    ) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if split_header:
            for byte in header:
                sock.sendall(bytes((byte,)))
                time.sleep(0.002)
            header = b""
        tls, incoming, outgoing = handshake(sock, context, first=header)
        tls.write(_request())
        sock.sendall(outgoing.read())
        answer = b""
        while True:
            try:
                chunk = tls.read(65536)
            except ssl.SSLWantReadError:
                if not feed(sock, incoming):
                    return answer
                continue
            except ssl.SSLZeroReturnError:
                return answer
            if not chunk:
                return answer
            answer += chunk
            sock.sendall(outgoing.read())  # a TLS 1.3 key update or alert, if any


def refused(port: int, context: ssl.SSLContext, **options: Any) -> bool:
    """Whether :func:`exchange` fails: a TLS error, a reset, or a close without an answer."""
    try:
        answer = exchange(port, context, **options)
    except OSError:  # ssl.SSLError, ConnectionResetError, a handshake cut short
        return True
    return _status(answer) != 200


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def _access_remotes(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage().split()[0] for r in caplog.records if r.name == "gateway.access"]


@pytest.fixture
async def gateway(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[Gateway]:
    # Before the listener starts: it decides once whether to write access lines.
    caplog.set_level(logging.INFO, logger="gateway")
    config = gateway_config(pki, tmp_path)
    listen = dataclasses.replace(config.listen, proxy_protocol=True)
    async with Gateway(dataclasses.replace(config, listen=listen)) as running:
        yield running


async def _refusals(gateway: Gateway, reason: str) -> float:
    text = gateway.stats.render().decode()
    sample = f'waba_gateway_proxy_header_refused_total{{reason="{reason}"}}'
    return metric(text, sample) if sample in text else 0


@pytest.mark.parametrize(
    ("header", "split", "remote"),
    [
        pytest.param(IPV4, False, "203.0.113.7", id="ipv4-with-client-hello-in-one-write"),
        pytest.param(IPV6, False, "2001:db8::7", id="ipv6"),
        pytest.param(IPV4, True, "203.0.113.7", id="header-a-byte-at-a-time"),
        pytest.param(v2(LOCAL, UNSPEC, b""), False, "127.0.0.1", id="local-command-tcp-peer"),
        pytest.param(V1_TCP4, False, "203.0.113.7", id="v1-tcp4-with-client-hello-in-one-write"),
        pytest.param(V1_TCP6, False, "2001:db8::7", id="v1-tcp6"),
        pytest.param(V1_TCP4, True, "203.0.113.7", id="v1-a-byte-at-a-time"),
        pytest.param(V1_UNKNOWN, False, "127.0.0.1", id="v1-unknown-tcp-peer"),
        pytest.param(V1_LONGEST, False, "127.0.0.1", id="v1-longest-107-bytes"),
    ],
)
async def test_client_address_comes_from_the_proxy_header(
    gateway: Gateway,
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
    header: bytes,
    split: bool,
    remote: str,
) -> None:
    """The header's source address is what the access log and the console show; the TLS
    handshake after it is the client's own, however the header arrived."""
    answer = await asyncio.to_thread(
        exchange, gateway.port, pki.client_context("meta"), header=header, split_header=split
    )
    assert _status(answer) == 200, answer
    assert _access_remotes(caplog) == [remote]
    assert gateway.stats.totals().last_address == remote


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        pytest.param(b"", "missing", id="tls-without-header"),
        pytest.param(
            b"PROXY UNKNOWN " + b"x" * 93 + b"\r\n", "malformed", id="v1-header-108-bytes"
        ),
        pytest.param(
            b"PROXY TCP4 203.0.113.7 10.0.0.5 051234 8443\r\n", "malformed", id="v1-port-0"
        ),
        pytest.param(b"PROXY TCP4 2001:db8::7 ::1 1 2\r\n", "malformed", id="v1-tcp4-ipv6"),
        pytest.param(v2(0x2F, 0x11, b"\0" * 12), "malformed", id="unknown-command"),
    ],
)
async def test_connection_without_a_valid_header_is_refused_and_serving_goes_on(
    gateway: Gateway,
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
    header: bytes,
    reason: str,
) -> None:
    """No header, or a bad one: closed before TLS, logged and counted by reason (its series
    there at 0 from the start, for alerts on its increase); the next connection with a good
    header is served."""
    text = gateway.stats.render().decode()
    assert metric(text, f'waba_gateway_proxy_header_refused_total{{reason="{reason}"}}') == 0
    del caplog.records[:]
    context = pki.client_context("meta")
    assert await asyncio.to_thread(refused, gateway.port, context, header=header)

    async def counted() -> float | None:
        return await _refusals(gateway, reason) or None

    assert await eventually(counted, f"a refusal counted as {reason}") == 1
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith("connection from 127.0.0.1 refused: ")
    answer = await asyncio.to_thread(exchange, gateway.port, context, header=IPV4)
    assert _status(answer) == 200


async def test_connection_silent_after_connecting_is_closed_after_the_header_timeout(
    pki: Pki, tmp_path: Path
) -> None:
    """A peer that connects and sends nothing is not held for ever: closed at the request
    timeout (when shorter than the header's own), counted."""
    config = gateway_config(pki, tmp_path)
    listen = dataclasses.replace(config.listen, proxy_protocol=True, request_timeout_s=0.3)
    async with Gateway(dataclasses.replace(config, listen=listen)) as gateway:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the gateway
        writer.close()
        assert await _refusals(gateway, "timeout") == 1


# -- real HAProxy in front ------------------------------------------------------------------

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
CLIENT_ADDRESS = "127.0.0.2"  # the client binds here; HAProxy connects from 127.0.0.3
BALANCER_ADDRESS = "127.0.0.3"


@pytest.fixture
def haproxy(gateway: Gateway, tmp_path: Path) -> Iterator[int]:
    """HAProxy in TCP mode on a free port: TLS passes through untouched, each connection to
    the gateway starts with a PROXY v2 header. Yields HAProxy's port."""
    yield from _haproxy(gateway, tmp_path, "send-proxy-v2")


@pytest.fixture
def haproxy_v1(gateway: Gateway, tmp_path: Path) -> Iterator[int]:
    """The same HAProxy sending the v1 text header (``send-proxy``), as balancers that speak
    only v1 do."""
    yield from _haproxy(gateway, tmp_path, "send-proxy")


def _haproxy(gateway: Gateway, tmp_path: Path, send: str) -> Iterator[int]:
    if not Path(HAPROXY).exists():
        pytest.fail("haproxy is not installed (Debian: apt-get install haproxy; .ci/run does)")
    for _ in range(3):  # a free port may be taken by someone else before HAProxy binds it
        port = free_port()
        config = tmp_path / "haproxy.cfg"
        config.write_text(
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n"
            "  timeout server 30s\n"
            f"frontend edge\n  bind 127.0.0.1:{port}\n  default_backend gateway\n"
            "backend gateway\n"
            f"  server gw 127.0.0.1:{gateway.port} {send} source {BALANCER_ADDRESS}\n"
        )
        process = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            if _listening(process, port):
                yield port
                return
        finally:
            process.terminate()
            process.wait(timeout=10)
            output = process.stdout.read() if process.stdout else b""
            if process.stdout is not None:
                process.stdout.close()
    pytest.fail(f"haproxy did not start: {output.decode(errors='replace')}")


def _listening(process: subprocess.Popen[bytes], port: int) -> bool:
    """Whether HAProxy came to accept on ``port`` (False: it exited, e.g. the port was taken)."""
    deadline = time.monotonic() + 10
    while process.poll() is None and time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


async def _meta_is_taken_and_named(
    gateway: Gateway, port: int, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """Meta's client, from :data:`CLIENT_ADDRESS`, through the balancer at ``port``: answered
    200, its certificate checked by the gateway, its address (not the balancer's) logged and
    shown."""
    del caplog.records[:]
    answer = await asyncio.to_thread(
        exchange, port, pki.client_context("meta"), source=CLIENT_ADDRESS
    )
    assert _status(answer) == 200, answer
    assert _access_remotes(caplog) == [CLIENT_ADDRESS]
    totals = gateway.stats.totals()
    assert totals.last_address == CLIENT_ADDRESS
    assert totals.clients == {"client.webhooks.fbclientcerts.com": 1}


async def test_haproxy_in_front_passes_tls_through_and_names_the_client(
    gateway: Gateway, haproxy: int, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """Through HAProxy (TCP mode, send-proxy-v2): Meta's certificate is checked by the gateway
    itself (TLS passthrough), and the client's address, not HAProxy's, is logged and shown."""
    await _meta_is_taken_and_named(gateway, haproxy, pki, caplog)


async def test_haproxy_sending_v1_names_the_client(
    gateway: Gateway, haproxy_v1: int, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """Through HAProxy sending the v1 line (``send-proxy``) before the client's ClientHello:
    the line is read to its CRLF and no further, and the client's address is what v2 gives."""
    await _meta_is_taken_and_named(gateway, haproxy_v1, pki, caplog)


@pytest.mark.parametrize("kind", ["impostor", "none"])
async def test_haproxy_in_front_the_gateway_still_refuses_a_bad_client_certificate(
    gateway: Gateway, haproxy: int, pki: Pki, caplog: pytest.LogCaptureFixture, kind: ClientKind
) -> None:
    """The balancer terminates nothing: a client certificate the gateway does not trust fails
    the handshake, and the failure is logged with the client's address."""
    del caplog.records[:]
    context = pki.client_context(kind)
    assert await asyncio.to_thread(refused, haproxy, context, source=CLIENT_ADDRESS)

    def failure() -> list[str]:
        return [r.getMessage() for r in caplog.records if "TLS handshake" in r.getMessage()]

    async def logged() -> list[str] | None:
        return failure() or None

    (line,) = await eventually(logged, "the handshake failure's log line")
    assert line.startswith(f"TLS handshake from {CLIENT_ADDRESS} failed: ")


async def test_direct_connection_bypassing_haproxy_is_refused(
    gateway: Gateway, haproxy: int, pki: Pki
) -> None:
    """With proxy_protocol on, a client that skips the balancer gets no TLS at all."""
    assert await asyncio.to_thread(refused, gateway.port, pki.client_context("meta"))
    assert await _refusals(gateway, "missing") == 1


# -- waba-gateway serve with two workers ----------------------------------------------------


def _header_from(address: str) -> bytes:
    return v2(0x21, 0x11, inet(address, 40000, "10.0.0.5", 8443))


async def test_serve_with_two_workers_reads_the_header_on_every_connection(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """The configuration key as an operator sets it, through ``serve`` and its workers sharing
    one socket: each connection's client address is logged, a connection without a header is
    refused, and the gateway stops cleanly."""
    config = write_config(pki, tmp_path, target_url=sink.url("/sink"), workers=2)
    config.write_text(
        config.read_text().replace("workers = 2", "workers = 2\nproxy_protocol = true")
    )
    port = listen_port(config)
    context = pki.client_context("meta")
    with serving(config) as process:
        deadline = time.monotonic() + DEADLINE_S
        while await asyncio.to_thread(refused, port, context, header=_header_from("192.0.2.1")):
            assert process.poll() is None, "the gateway exited"
            assert time.monotonic() < deadline, "the gateway did not start listening"
            await asyncio.sleep(0.1)
        clients = [f"198.51.100.{n}" for n in range(1, 9)]
        for client in clients:
            answer = await asyncio.to_thread(exchange, port, context, header=_header_from(client))
            assert _status(answer) == 200
        assert await asyncio.to_thread(refused, port, context)  # no header
        output = stop(process)
    logged = set(re.findall(r"(\S+) POST /webhook 200 ", output))
    assert set(clients) <= logged
    assert "connection from 127.0.0.1 refused: no PROXY protocol header" in output
    assert process.returncode == 0


def test_check_reminds_that_only_the_balancer_may_reach_the_port(pki: Pki, tmp_path: Path) -> None:
    """``check`` says the header is required, and who alone may connect."""
    config = gateway_config(pki, tmp_path)
    proxied = dataclasses.replace(
        config, listen=dataclasses.replace(config.listen, proxy_protocol=True)
    )
    now = datetime.now(UTC)
    line = (
        "ok: listen.proxy_protocol = true: every connection must start with a PROXY protocol"
        " header (v1 or v2); open the listen port to the load balancer alone"
    )
    assert line in report(proxied, now)
    assert line not in report(config, now)
