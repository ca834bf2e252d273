"""The callback listener's HTTP/1.x over real mTLS connections, byte by byte.

The other callback tests speak through an HTTP client; these write raw requests on a TLS
socket, so they can pipeline, speak HTTP/1.0, send malformed or oversized heads and stall
mid-request, the way a real peer on the internet might.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from helpers import (
    VERIFY_TOKEN,
    eventually,
    gateway_config,
    message_body,
    meta_signature,
    metric,
    sink_target,
)
from memory_tls import handshake
from pki import ClientKind, Pki
from sink import DEADLINE_S, Sink

from gateway.runtime.gateway import Gateway

PATH = "/webhook"
HANDSHAKE = urlencode(
    {"hub.mode": "subscribe", "hub.challenge": "4242", "hub.verify_token": VERIFY_TOKEN}
)


@dataclasses.dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


class Client:
    """One TLS connection to the gateway, presenting Meta's client certificate."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, gateway: Gateway, context: ssl.SSLContext) -> Client:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", gateway.port, ssl=context, server_hostname="localhost"
        )
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, *, head: bool = False) -> Reply:
        status_line = await self.reader.readuntil(b"\r\n")
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while (line := await self.reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        length = 0 if head or status == 100 else int(headers.get("content-length", "0"))
        return Reply(status, headers, await self.reader.readexactly(length))

    async def closed(self) -> bool:
        """True when the gateway has closed the connection (EOF, after any unread reply)."""
        try:
            return await asyncio.wait_for(self.reader.read(), timeout=5) == b""
        except ConnectionError:
            return True

    def close(self) -> None:
        self.writer.close()


def post(body: bytes, *, version: str = "1.1", extra: str = "") -> bytes:
    head = (
        f"POST {PATH} HTTP/{version}\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nX-Hub-Signature-256: {meta_signature(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


def get(target: str, *, method: str = "GET", version: str = "1.1", extra: str = "") -> bytes:
    return f"{method} {target} HTTP/{version}\r\nHost: localhost\r\n{extra}\r\n".encode()


@pytest.fixture
async def gateway(pki: Pki, tmp_path: Path, sink: Sink) -> AsyncIterator[Gateway]:
    config = gateway_config(pki, tmp_path, targets=[sink_target(sink)], max_body_bytes=4096)
    listen = dataclasses.replace(config.listen, request_timeout_s=0.4, idle_timeout_s=0.4)
    async with Gateway(dataclasses.replace(config, listen=listen)) as running:
        yield running


@pytest.fixture
async def client(gateway: Gateway, pki: Pki) -> AsyncIterator[Client]:
    connected = await Client.connect(gateway, pki.client_context("meta"))
    yield connected
    connected.close()


def _handshake(challenge: str) -> bytes:
    query = {"hub.mode": "subscribe", "hub.challenge": challenge, "hub.verify_token": VERIFY_TOKEN}
    return get(f"{PATH}?{urlencode(query)}")


async def test_every_new_connection_is_answered_without_delay(gateway: Gateway, pki: Pki) -> None:
    """Twenty requests, each on a new connection whose ClientHello leaves at once, are each
    answered within two seconds (uvloop once lost the ClientHello of about half of them, and
    their handshakes waited out the 30 s timeout)."""
    context = pki.client_context("meta")
    for number in range(20):
        async with asyncio.timeout(2):
            client = await Client.connect(gateway, context)
            await client.send(post(message_body(f"new connection {number}")))
            assert (await client.reply()).status == 200
        client.close()


async def test_pipelined_requests_are_answered_in_order(client: Client, sink: Sink) -> None:
    """Six requests in one write, each with an answer of its own (a challenge echoed, a
    duplicate, a refusal): the answers come in the order asked, both bodies are forwarded."""
    first, second = message_body("first"), message_body("second")
    unsigned = post(first).replace(b"X-Hub-Signature-256: sha256=", b"X-Hub-Signature-256: x")
    await client.send(
        post(first) + _handshake("4242") + post(first) + unsigned + _handshake("17") + post(second)
    )
    answers = [await client.reply() for _ in range(6)]
    assert [(a.status, a.body) for a in answers] == [
        (200, b"ok\n"),
        (200, b"4242"),
        (200, b"ok (duplicate)\n"),
        (401, answers[3].body),
        (200, b"17"),
        (200, b"ok\n"),
    ]
    received = await sink.wait_for(2)
    assert sorted(r.body for r in received) == sorted([first, second])


async def test_http10_keep_alive_is_honoured_and_announced(client: Client) -> None:
    """HTTP/1.0 with ``Connection: keep-alive`` (as ApacheBench sends it) keeps the connection."""
    for text in ("one", "two"):
        await client.send(
            post(message_body(text), version="1.0", extra="Connection: keep-alive\r\n")
        )
        answer = await client.reply()
        assert (answer.status, answer.headers["connection"]) == (200, "keep-alive")


async def test_http10_without_keep_alive_is_answered_then_closed(client: Client) -> None:
    await client.send(post(message_body("once"), version="1.0"))
    answer = await client.reply()
    assert (answer.status, answer.headers["connection"]) == (200, "close")
    assert await client.closed()


async def test_connection_close_is_answered_then_closed(client: Client) -> None:
    await client.send(get(f"{PATH}?{HANDSHAKE}", extra="Connection: close\r\n"))
    answer = await client.reply()
    assert (answer.status, answer.body, answer.headers["connection"]) == (200, b"4242", "close")
    assert await client.closed()


async def test_answers_carry_date_length_and_plain_text_type(client: Client) -> None:
    await client.send(post(message_body("headers")))
    answer = await client.reply()
    assert answer.headers["content-type"] == "text/plain; charset=utf-8"
    assert answer.headers["content-length"] == "3"
    assert answer.headers["date"].endswith(" GMT")


async def test_acknowledgements_carry_the_date_of_their_own_second(
    gateway: Gateway, pki: Pki
) -> None:
    """Acknowledgements are made once a second and reused within it: one a second later has
    that second's Date, and a duplicate's has its own reason and length."""
    body = message_body("dated")
    answers = []
    for _ in range(2):
        client = await Client.connect(gateway, pki.client_context("meta"))
        await client.send(post(body))
        answers.append(await client.reply())
        client.close()
        await asyncio.sleep(1.1)  # into the next second of the clock
    first, second = answers
    assert (first.body, second.body) == (b"ok\n", b"ok (duplicate)\n")
    assert second.headers["content-length"] == str(len(second.body))
    dates = [parsedate_to_datetime(answer.headers["date"]) for answer in answers]
    assert dates[1] > dates[0]


async def test_unknown_path_gets_404_and_the_connection_stays_usable(client: Client) -> None:
    await client.send(get("/elsewhere"))
    assert (await client.reply()).status == 404
    await client.send(get(f"{PATH}?{HANDSHAKE}"))
    assert (await client.reply()).body == b"4242"


async def test_unknown_long_path_is_shortened_in_the_answer(client: Client) -> None:
    await client.send(get("/" + "a" * 5000))
    answer = await client.reply()
    assert answer.status == 404
    assert len(answer.body) < 200


async def test_other_method_gets_405_naming_the_allowed_ones(client: Client) -> None:
    await client.send(get(PATH, method="DELETE"))
    answer = await client.reply()
    assert (answer.status, answer.headers["allow"]) == (405, "GET, POST")


async def test_head_of_the_handshake_has_no_body(client: Client) -> None:
    await client.send(get(f"{PATH}?{HANDSHAKE}", method="HEAD") + get(f"{PATH}?{HANDSHAKE}"))
    head = await client.reply(head=True)
    assert (head.status, head.headers["content-length"], head.body) == (200, "4", b"")
    assert (await client.reply()).body == b"4242"


async def test_percent_encoded_handshake_parameters_are_decoded(client: Client) -> None:
    query = urlencode(
        {"hub.mode": "subscribe", "hub.challenge": "a b/é", "hub.verify_token": VERIFY_TOKEN}
    )
    await client.send(get(f"{PATH}?{query}"))
    assert (await client.reply()).body == "a b/é".encode()


async def test_malformed_request_gets_400_and_is_closed(client: Client) -> None:
    await client.send(b"NOT HTTP AT ALL\r\n\r\n")
    answer = await client.reply()
    assert (answer.status, answer.headers["connection"]) == (400, "close")
    assert await client.closed()


async def test_url_over_the_limit_gets_414_and_is_closed(client: Client) -> None:
    await client.send(get(PATH + "?" + "x" * 9000))
    assert (await client.reply()).status == 414
    assert await client.closed()


async def test_head_over_the_limit_gets_431_and_is_closed(client: Client) -> None:
    filler = "".join(f"X-Filler-{n}: {'y' * 1000}\r\n" for n in range(70))
    await client.send(get(PATH, extra=filler))
    assert (await client.reply()).status == 431
    assert await client.closed()


async def test_header_line_that_never_ends_gets_431_and_is_closed(client: Client) -> None:
    """A header value sent 8 KB at a time without a line end is cut off past the head limit."""
    assert (await _endless_line(client, f"GET {PATH} HTTP/1.1\r\nX-Endless: ".encode())) == 431
    assert await client.closed()


async def _endless_line(client: Client, start: bytes) -> int:
    """Send ``start``, then a line that never ends, 8 KB per read, until the gateway answers;
    the answer's status."""
    await client.send(start)
    answer = asyncio.create_task(client.reply())
    for _ in range(40):  # 320 KB at most; the limit is 64 KiB
        if answer.done():
            break
        await client.send(b"y" * 8192)
        await asyncio.sleep(0.005)  # separate reads: each one continues the same line
    return (await answer).status


async def test_announced_body_over_the_limit_gets_413_before_it_is_sent(
    gateway: Gateway, client: Client, pki: Pki
) -> None:
    """The head alone earns the 413; the gateway then closes and keeps serving others."""
    await client.send(f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n".encode())
    assert (await client.reply()).status == 413
    assert await client.closed()
    other = await Client.connect(gateway, pki.client_context("meta"))
    await other.send(post(message_body("after")))
    assert (await other.reply()).status == 200
    other.close()


async def test_expect_100_continue_is_answered_before_the_body(client: Client) -> None:
    body = message_body("continue")
    request = post(body, extra="Expect: 100-continue\r\n")
    head, _, _ = request.partition(b"\r\n\r\n")
    await client.send(head + b"\r\n\r\n")
    assert (await client.reply()).status == 100
    await client.send(body)
    assert (await client.reply()).status == 200


async def test_expect_100_continue_behind_a_pipelined_request_comes_after_its_answer(
    client: Client,
) -> None:
    """A request waiting for 100 behind one not yet answered gets it once that answer is
    written, not never (the client would wait out its own timer before sending the body)."""
    first, second = message_body("first in line"), message_body("waits for 100")
    request = post(second, extra="Expect: 100-continue\r\n")
    head, _, _ = request.partition(b"\r\n\r\n")
    await client.send(post(first) + head + b"\r\n\r\n")
    async with asyncio.timeout(2):
        assert [(await client.reply()).status for _ in range(2)] == [200, 100]
    await client.send(second)
    assert (await client.reply()).status == 200


@pytest.mark.parametrize(
    ("request_bytes", "reason"),
    [
        (post(b"{}").replace(b"Host: localhost\r\n", b""), b"without a Host header"),
        (post(b"{}", extra="Host: elsewhere\r\n"), b"more than one Host header"),
        (
            post(b"{}", extra="Connection: Upgrade\r\nUpgrade: websocket\r\n"),
            b"protocol upgrades are not supported",
        ),
    ],
    ids=["no host", "two hosts", "upgrade"],
)
async def test_a_request_the_gateway_cannot_take_gets_one_400_and_is_closed(
    client: Client, request_bytes: bytes, reason: bytes
) -> None:
    """RFC 9112, 3.2 (Host exactly once in HTTP/1.1) and no protocol switch: one answer, the
    400, never an answer to the request as well."""
    await client.send(request_bytes)
    answer = await client.reply()
    assert (answer.status, answer.headers["connection"]) == (400, "close")
    assert reason in answer.body
    assert await client.closed(), "nothing after the 400"


@pytest.mark.parametrize(
    ("kind", "head", "status"),
    [
        ("meta", "POST /elsewhere HTTP/1.1\r\nContent-Length: 10\r\n", 404),
        ("meta", f"PUT {PATH} HTTP/1.1\r\nContent-Length: 10\r\n", 405),
        ("meta", f"POST {PATH} HTTP/1.1\r\nContent-Length: 5000\r\n", 413),
        ("wrong_cn", f"POST {PATH} HTTP/1.1\r\nContent-Length: 10\r\n", 403),
    ],
    ids=["404", "405", "413", "403"],
)
async def test_expect_100_continue_gets_the_refusal_instead_of_100(
    gateway: Gateway, pki: Pki, kind: ClientKind, head: str, status: int
) -> None:
    """A request that will be refused is answered that, not 100, and closed: 100 would ask
    for a body the gateway is not going to read (RFC 9110, 10.1.1)."""
    client = await Client.connect(gateway, pki.client_context(kind))
    await client.send(f"{head}Host: x\r\nExpect: 100-continue\r\n\r\n".encode())
    answer = await client.reply()
    assert (answer.status, answer.headers["connection"]) == (status, "close")
    assert await client.closed()
    client.close()


async def test_expect_100_continue_from_http10_is_ignored(client: Client) -> None:
    """An HTTP/1.0 client gets no 100, only the answer (RFC 9110, 10.1.1)."""
    await client.send(
        post(message_body("old client"), version="1.0", extra="Expect: 100-continue\r\n")
    )
    answer = await client.reply()
    assert (answer.status, answer.body) == (200, b"ok\n")


async def test_request_not_received_in_time_gets_408_and_is_closed(client: Client) -> None:
    """A head that never ends (a slow or stalled client) is cut off after request_timeout_s."""
    await client.send(f"POST {PATH} HTTP/1.1\r\nHost: x\r\n".encode())
    answer = await client.reply()
    assert (answer.status, answer.headers["connection"]) == (408, "close")
    assert await client.closed()


async def test_idle_keep_alive_connection_is_closed_after_idle_timeout(client: Client) -> None:
    """A connection that asks nothing more after its answer is closed, not kept for ever."""
    await client.send(post(message_body("then silence")))
    answer = await client.reply()
    assert (answer.status, answer.headers["connection"]) == (200, "keep-alive")
    assert await client.closed()


async def test_blank_lines_do_not_keep_an_idle_connection_open(client: Client) -> None:
    """Empty lines between requests may be ignored (RFC 9112, 2.2) but are not a request: a
    client that sends only those every 0.1 s is still closed after idle_timeout_s (0.4 s)."""
    await client.send(post(message_body("then blank lines")))
    assert (await client.reply()).status == 200
    closed = asyncio.Event()

    async def blank_lines() -> None:
        for _ in range(30):  # for 3 s at most
            if closed.is_set():
                return
            client.writer.write(b"\r\n")
            await asyncio.sleep(0.1)

    sending = asyncio.create_task(blank_lines())
    assert await client.closed()
    closed.set()
    assert not sending.done(), "closed only once the blank lines stopped"
    await sending


@pytest.fixture
def raw_socket() -> Iterator[socket.socket]:
    """A TCP socket, closed after the test whatever its outcome."""
    with socket.socket() as sock:
        yield sock


async def test_a_client_that_never_reads_is_held_to_a_bounded_buffer_then_closed(
    gateway: Gateway, pki: Pki, raw_socket: socket.socket
) -> None:
    """700 pipelined handshakes with 4 KB answers (2.9 MB), not a byte of them read: the
    gateway stops answering once its write buffer passes the high-water mark, so it never
    holds more than that plus an answer, and closes the connection after idle_timeout_s (0.4 s)."""
    # Not a client whose TLS library reads for it: asyncio's takes up to 256 KiB off the
    # socket unasked, so the gateway's buffer would cross its mark and drain again, several
    # times, and where the last drain left it (just over the mark, or under it and over the
    # low-water mark, no longer sent and not resumed) would decide whether a sample every 5 ms
    # sees the mark passed. Past its handshake this client reads nothing at all.
    sock = raw_socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(DEADLINE_S)

    def connect() -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
        sock.connect(("127.0.0.1", gateway.port))
        return handshake(sock, pki.client_context("meta"))

    tls, _, outgoing = await asyncio.to_thread(connect)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    # The gateway's side of the connection: its write buffer cannot be seen from outside.
    listener = gateway._listener
    assert listener is not None
    while not listener.connections:  # noqa: ASYNC110 (the handshake's last step, a moment)
        await asyncio.sleep(0.01)
    (connection,) = listener.connections
    transport = connection._transport
    assert transport is not None
    # On loopback the kernel would take megabytes of answers off the gateway's hands; a small
    # send buffer stands for a slow link, so what the gateway itself holds shows.
    transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    challenge = "c" * 4096
    query = urlencode(
        {"hub.mode": "subscribe", "hub.challenge": challenge, "hub.verify_token": VERIFY_TOKEN}
    )
    tls.write(get(f"{PATH}?{query}") * 700)
    # Never done: the gateway stops reading too once its answers are not taken.
    sending = asyncio.create_task(loop.sock_sendall(sock, outgoing.read()))
    high = transport.get_write_buffer_limits()[1]
    most = 0
    deadline = time.monotonic() + DEADLINE_S
    while not transport.is_closing() and time.monotonic() < deadline:
        most = max(most, transport.get_write_buffer_size())
        await asyncio.sleep(0.005)
    sending.cancel()
    assert transport.is_closing(), "still open after idle_timeout_s"
    assert high < most <= high + 2 * (len(challenge) + 200)
    # Closed from the gateway's side: the bytes the kernel holds, then the end (or a reset);
    # a connection still open fails here with TimeoutError.
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(5):
            while await loop.sock_recv(sock, 65536):
                pass


async def test_wrong_cn_gets_403_on_every_request_of_the_connection(
    gateway: Gateway, pki: Pki, sink: Sink
) -> None:
    wrong = await Client.connect(gateway, pki.client_context("wrong_cn"))
    await wrong.send(post(message_body("intruder")) + get(f"{PATH}?{HANDSHAKE}"))
    assert [(await wrong.reply()).status for _ in range(2)] == [403, 403]
    wrong.close()
    assert sink.received == []


async def test_shutdown_closes_idle_keep_alive_connections(
    gateway: Gateway, client: Client
) -> None:
    await client.send(post(message_body("before shutdown")))
    assert (await client.reply()).status == 200
    await gateway.close()
    assert await client.closed()


@pytest.fixture
async def roomy_client(pki: Pki, tmp_path: Path, sink: Sink) -> AsyncIterator[Client]:
    """A client of a gateway that takes bodies up to 1 MiB (Meta sends up to 3 MB)."""
    config = gateway_config(pki, tmp_path, targets=[sink_target(sink)], max_body_bytes=1024**2)
    async with Gateway(config) as running:
        connected = await Client.connect(running, pki.client_context("meta"))
        yield connected
        connected.close()


async def test_large_keep_alive_posts_are_not_mistaken_for_large_heads(
    roomy_client: Client,
) -> None:
    """POSTs with 100 KB bodies, each arriving whole, get 200 and keep the connection open."""
    for n in range(3):
        await roomy_client.send(post(message_body(f"large {n} " + "x" * 100_000)))
        answer = await roomy_client.reply()
        assert (answer.status, answer.headers["connection"]) == (200, "keep-alive")
    await roomy_client.send(get(f"{PATH}?{HANDSHAKE}"))
    assert (await roomy_client.reply()).status == 200


async def test_many_pipelined_requests_in_one_write_are_not_mistaken_for_a_large_head(
    client: Client,
) -> None:
    """800 handshakes (about 100 KB) in one write: 800 answers 200, then the connection still
    serves the next request (no stray 431, no close)."""
    await client.send(get(f"{PATH}?{HANDSHAKE}") * 800)
    answers = [await client.reply() for _ in range(800)]
    assert {(a.status, a.headers["connection"]) for a in answers} == {(200, "keep-alive")}
    await client.send(get(f"{PATH}?{HANDSHAKE}"))
    assert (await client.reply()).status == 200


@pytest.mark.parametrize("version", ["2.0", "0.9", "1.2", "3.0"])
async def test_http_version_other_than_1_0_or_1_1_gets_505_and_is_closed(
    client: Client, version: str
) -> None:
    """A well-formed request line of another HTTP version is answered 505 (RFC 9110, 15.6.6)."""
    await client.send(get(f"{PATH}?{HANDSHAKE}", version=version))
    answer = await client.reply()
    assert (answer.status, answer.headers["connection"]) == (505, "close")
    assert await client.closed()


@pytest.mark.parametrize(
    ("kind", "reason", "detail"),
    [
        ("none", "no_certificate", "PEER_DID_NOT_RETURN_A_CERTIFICATE"),
        ("impostor", "untrusted", "unable to get local issuer certificate"),
        ("expired", "expired", "certificate has expired"),
    ],
)
async def test_failed_tls_handshake_is_logged_once_and_counted_by_reason(
    gateway: Gateway,
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
    kind: ClientKind,
    reason: str,
    detail: str,
) -> None:
    """A client certificate refused in the handshake leaves one log line with the address and
    OpenSSL's reason, and counts one failure under that reason."""
    caplog.set_level(logging.INFO, logger="gateway.edge.listener")
    refused: Client | None = None
    with contextlib.suppress(ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
        refused = await Client.connect(gateway, pki.client_context(kind))
        await refused.send(get(f"{PATH}?{HANDSHAKE}"))  # TLS 1.3: refused only now
        await refused.reply()
    if refused is not None:
        refused.close()
    sample = f'waba_gateway_tls_handshake_failures_total{{reason="{reason}"}}'

    async def counted() -> float:
        text = gateway.stats.render().decode()
        return metric(text, sample) if sample in text else 0

    assert await eventually(counted, sample) == 1
    lines = [r.getMessage() for r in caplog.records if "TLS handshake" in r.getMessage()]
    assert lines == [f"TLS handshake from 127.0.0.1 failed: {reason} ({detail})"]


async def test_client_refusing_the_server_certificate_is_counted_as_a_client_alert(
    gateway: Gateway, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that does not trust the gateway's certificate ends the handshake with an
    alert: one failure, reason "client_alert", OpenSSL's name for the alert in the log."""
    caplog.set_level(logging.INFO, logger="gateway.edge.listener")
    distrustful = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    distrustful.load_verify_locations(cafile=pki.client_ca_file)  # not the server's CA

    def handshake() -> None:
        # A blocking socket: OpenSSL sends its alert on it, where asyncio's client would drop
        # the connection without one.
        with (
            socket.create_connection(("127.0.0.1", gateway.port), timeout=DEADLINE_S) as sock,
            pytest.raises(ssl.SSLCertVerificationError),
        ):
            distrustful.wrap_socket(sock, server_hostname="localhost")

    await asyncio.to_thread(handshake)
    sample = 'waba_gateway_tls_handshake_failures_total{reason="client_alert"}'

    async def counted() -> float:
        text = gateway.stats.render().decode()
        return metric(text, sample) if sample in text else 0

    assert await eventually(counted, sample) == 1
    lines = [r.getMessage() for r in caplog.records if "TLS handshake" in r.getMessage()]
    assert lines == ["TLS handshake from 127.0.0.1 failed: client_alert (TLSV1_ALERT_UNKNOWN_CA)"]


async def test_plain_http_on_the_tls_port_is_counted_as_a_protocol_failure(
    gateway: Gateway,
) -> None:
    """A request in clear text is no TLS handshake: one failure, reason "protocol"."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(get(PATH))
    await reader.read()  # the gateway closes
    writer.close()
    sample = 'waba_gateway_tls_handshake_failures_total{reason="protocol"}'

    async def counted() -> float:
        text = gateway.stats.render().decode()
        return metric(text, sample) if sample in text else 0

    assert await eventually(counted, sample) == 1


async def test_an_acknowledged_notification_makes_no_task_of_its_own(
    client: Client, sink: Sink
) -> None:
    """Verified, stored and answered 200 without a task (a task and its coroutines cost the
    event loop more per request than the answer's bytes); a refused one answers as before."""
    loop = asyncio.get_running_loop()
    made: list[str] = []

    def counting(
        loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any
    ) -> asyncio.Task[Any]:
        made.append(getattr(coro, "__qualname__", ""))
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(counting)  # type: ignore[arg-type]
    try:
        body = message_body("no task")
        await client.send(post(body))
        assert (await client.reply()).body == b"ok\n"
        unsigned = post(body).replace(b"X-Hub-Signature-256: sha256=", b"X-Hub-Signature-256: x")
        await client.send(unsigned)
        assert (await client.reply()).status == 401
    finally:
        loop.set_task_factory(None)
    assert [name for name in made if name.startswith("Callback.")] == []
    assert [r.body for r in await sink.wait_for(1)] == [body]


@pytest.mark.parametrize(
    ("head_signature", "trailer_signature", "status"),
    [
        pytest.param("wrong", "right", 401, id="a trailer does not put a right signature in"),
        pytest.param("right", "wrong", 200, id="a trailer does not spoil a right signature"),
    ],
)
async def test_headers_after_a_chunked_body_are_not_the_requests_headers(
    client: Client, head_signature: str, trailer_signature: str, status: int
) -> None:
    """A chunked body may end with trailer fields (RFC 9112 7.1.2). The parser hands them
    over as it hands over the head's headers; a signature among them is not the request's:
    the one sent in the head decides, whichever is right."""
    body = message_body("with a trailer")
    signatures = {"right": meta_signature(body), "wrong": meta_signature(body, "not-the-secret")}
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Transfer-Encoding: chunked\r\nX-Hub-Signature-256: {signatures[head_signature]}\r\n\r\n"
    ).encode()
    chunks = b"%x\r\n" % len(body) + body + b"\r\n0\r\n"
    trailer = f"X-Hub-Signature-256: {signatures[trailer_signature]}\r\n\r\n".encode()
    await client.send(head + chunks + trailer)
    assert (await client.reply()).status == status


async def test_trailer_line_that_never_ends_gets_431_and_is_closed(client: Client) -> None:
    """A chunked body's trailer section (RFC 9112 7.1.2) is held to the head's limit, as the
    head is: a trailer field sent 8 KB at a time without a line end is cut off past 64 KiB,
    not kept (and copied whole on every read) until the request times out."""
    body = message_body("before an endless trailer")
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
        f"X-Hub-Signature-256: {meta_signature(body)}\r\n\r\n"
    ).encode()
    chunks = b"%x\r\n" % len(body) + body + b"\r\n0\r\n"
    assert await _endless_line(client, head + chunks + b"X-Endless: ") == 431
    assert await client.closed()


async def test_http10_chunked_request_is_answered_then_closed_despite_keep_alive(
    client: Client, sink: Sink
) -> None:
    """HTTP/1.0 has no Transfer-Encoding: a message with one is framed faultily, and the
    connection closes after its answer (RFC 9112 6.1) even if it asked to be kept alive, so
    nothing after it is read as a request of its own."""
    body = message_body("chunked over HTTP/1.0")
    head = (
        f"POST {PATH} HTTP/1.0\r\nHost: localhost\r\nConnection: keep-alive\r\n"
        f"Transfer-Encoding: chunked\r\nX-Hub-Signature-256: {meta_signature(body)}\r\n\r\n"
    ).encode()
    await client.send(head + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
    answer = await client.reply()
    assert (answer.status, answer.headers["connection"]) == (200, "close")
    assert await client.closed()
    assert [r.body for r in await sink.wait_for(1)] == [body]
