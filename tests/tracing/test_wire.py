"""The exporter's HTTP/1.1 connection to the collector against real loopback servers: how each
kind of answer ends (kept for the next export or closed), a large body sent whole, TLS to a
collector trusted through OTEL_EXPORTER_OTLP_CERTIFICATE, and headers that would break the
request's framing left out."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from otlp import Receiver

from gateway.config import TracingConfig
from gateway.tracing.export import Exporting
from gateway.tracing.spans import Tracing
from gateway.tracing.wire import Connection, WireError


class CannedServer:
    """A loopback server answering every request with ``answer``'s pieces (written one by one),
    recording each request's head and body and how many connections it accepted."""

    def __init__(self, answer: list[bytes]) -> None:
        self.answer = answer
        self.requests: list[tuple[bytes, bytes]] = []
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                accepted, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(accepted,), daemon=True).start()

    def _handle(self, sock: socket.socket) -> None:
        with sock:
            got = b""
            while True:
                while b"\r\n\r\n" not in got:
                    more = sock.recv(65536)
                    if not more:
                        return
                    got += more
                head, _, got = got.partition(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                while len(got) < length:
                    more = sock.recv(1 << 20)
                    if not more:
                        return
                    got += more
                body, got = got[:length], got[length:]
                self.requests.append((head, body))
                for piece in self.answer:
                    sock.sendall(piece)
                if not self.answer:
                    return  # closed without an answer

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def canned() -> Iterator[list[CannedServer]]:
    servers: list[CannedServer] = []
    yield servers
    for server in servers:
        server.close()


HEAD = b"POST /v1/traces HTTP/1.1\r\nHost: c\r\nContent-Length: %d\r\n\r\n"


@pytest.mark.parametrize(
    ("answer", "status", "kept"),
    [
        ([b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"], 200, True),
        ([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"], 200, True),
        ([b"HTTP/1.1 200 OK\r\nConte", b"nt-Length: 5\r\n\r", b"\nhel", b"lo"], 200, True),
        ([b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"], 200, False),
        ([b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"], 200, False),
        ([b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n"], 200, True),
        ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"], 200, False),
        ([b"HTTP/1.1 200 OK\r\n\r\n"], 200, False),  # read to the close: not kept
        ([b"HTTP/1.1 204 No Content\r\n\r\n"], 204, True),
        ([b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy"], 503, True),
        ([b"HTTP/1.1 400 Bad Request\r\nContent-Length: 7\r\n\r\nrefused"], 400, True),
    ],
)
def test_each_answer_gives_its_status_and_keeps_the_connection_only_when_framed(
    canned: list[CannedServer], answer: list[bytes], status: int, kept: bool
) -> None:
    """An answer with its length given (or none possible) leaves the connection for the next
    export, which then goes over it; anything else closes it after the status."""
    server = CannedServer(answer)
    canned.append(server)
    connection = Connection("127.0.0.1", server.port, 5.0, None)
    body = b"x" * 10
    assert connection.post(HEAD % len(body), body) == status
    assert connection.is_open is kept
    assert connection.post(HEAD % len(body), body) == status
    assert server.connections == (1 if kept else 2)
    assert [request[1] for request in server.requests] == [body, body]
    connection.close()


@pytest.mark.parametrize(
    "answer",
    [
        [],  # closed without a word
        [b"SMTP ready\r\n\r\n"],
        [b"HTTP/1.1 OK\r\n\r\n"],
        [b"HTTP/1.1 200 OK\r\nContent-Length: lots\r\n\r\n"],
    ],
)
def test_an_answer_that_is_not_http_is_an_error_and_closes_the_connection(
    canned: list[CannedServer], answer: list[bytes]
) -> None:
    """No status can be read: an OSError the poster treats as no answer, connection closed."""
    server = CannedServer(answer)
    canned.append(server)
    connection = Connection("127.0.0.1", server.port, 5.0, None)
    with pytest.raises(WireError):
        connection.post(HEAD % 1, b"x")
    assert not connection.is_open


def test_a_body_larger_than_the_socket_buffers_arrives_whole(
    canned: list[CannedServer],
) -> None:
    """A head and a body of several megabytes, sent together, arrive byte for byte."""
    server = CannedServer([b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"])
    canned.append(server)
    connection = Connection("127.0.0.1", server.port, 5.0, None)
    body = bytes(range(256)) * (16 * 1024)  # 4 MiB
    assert connection.post(HEAD % len(body), body) == 200
    ((head, received),) = server.requests
    assert head + b"\r\n\r\n" == HEAD % len(body)
    assert received == body
    connection.close()


async def test_spans_reach_a_collector_over_tls_trusted_by_the_otlp_certificate_variable(
    tmp_path: Path,
) -> None:
    """An https endpoint is verified against OTEL_EXPORTER_OTLP_CERTIFICATE's CA, and the spans
    arrive over one kept connection."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca_file = tmp_path / "collector-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with Receiver(tls=server_context) as receiver:
        assert receiver.url.startswith("https://")
        exporting = Exporting(
            TracingConfig(enabled=True, endpoint=receiver.url),
            {"OTEL_EXPORTER_OTLP_CERTIFICATE": str(ca_file), "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "1"},
        )
        for path in ("/a", "/b"):
            Tracing.end_server(exporting.tracing.server_span(path, {}, None), 200)
        await exporting.close()
    assert [span.name for span in receiver.spans] == ["POST /a", "POST /b"]
    assert receiver.connections == 1


async def test_a_collector_whose_certificate_is_not_trusted_gets_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without the collector's CA the TLS handshake fails: the batch is dropped with a warning
    naming the collector, never sent in the clear (closing ends the retries' backoff)."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(server_context)
    async with Receiver(tls=server_context) as receiver:
        exporting = Exporting(
            TracingConfig(enabled=True, endpoint=receiver.url),
            {"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "1", "OTEL_EXPORTER_OTLP_TIMEOUT": "2000"},
        )
        Tracing.end_server(exporting.tracing.server_span("/a", {}, None), 200)
        await exporting.close()
    assert receiver.spans == []
    assert exporting.batches.exported == 0
    assert any("answered nothing" in r.getMessage() for r in caplog.records)


async def test_a_header_that_would_break_the_request_is_left_out_and_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """OTEL_EXPORTER_OTLP_HEADERS with a line break in a value: that header is not sent (its
    name is warned of, its value never logged), the others and the spans are."""
    async with Receiver() as receiver:
        exporting = Exporting(
            TracingConfig(enabled=True, endpoint=receiver.url),
            {"OTEL_EXPORTER_OTLP_HEADERS": "x-bad=se%0D%0Acret,x-api-key=k1"},
        )
        Tracing.end_server(exporting.tracing.server_span("/a", {}, None), 200)
        await exporting.close()
    assert [span.name for span in receiver.spans] == ["POST /a"]
    assert receiver.headers[0]["x-api-key"] == "k1"
    assert "x-bad" not in receiver.headers[0]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "x-bad" in logged
    assert "cret" not in logged
