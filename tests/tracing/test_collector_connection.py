"""The exporter's connection to the collector against real loopback receivers: TLS to a
collector trusted through OTEL_EXPORTER_OTLP_CERTIFICATE, and headers that would break the
request's framing, or that the exporter sets itself, left out."""

from __future__ import annotations

import asyncio
import ssl
import threading
from pathlib import Path

import pytest
import trustme
from aiohttp import web
from multidict import CIMultiDict
from opentelemetry.sdk.resources import Resource
from otlp import Receiver

from gateway.config import TracingConfig
from gateway.errors import ConfigError
from gateway.tracing.collector import Collector
from gateway.tracing.encoding import Encoder
from gateway.tracing.export import THREAD_NAME, Batches, Exporting
from gateway.tracing.spans import Tracing


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
    assert (exporting.batches.exported, exporting.batches.dropped) == (0, 1)
    assert any("answered nothing" in r.getMessage() for r in caplog.records)
    assert any(
        r.getMessage() == "1 spans were dropped: the collector did not take them"
        for r in caplog.records
    )


# Each written with a secret (ending "r1t") HTTP/1.1 cannot carry where it stands, and what the
# warning says of it: a valid name, or that it shows nothing.
UNSENDABLE = {
    "line break": ("x-bad=s3k%0D%0Ar1t", "'x-bad'"),
    "not Latin-1": ("x-bad=s3k%E2%82%ACr1t", "'x-bad'"),
    "secret in the name": ("Authorization: Bearer s3kr1t=x", "not a valid HTTP header name"),
    "no equals sign": ("Authorization: Bearer s3kr1t", "not name=value"),
}


@pytest.mark.parametrize(("written", "warned"), UNSENDABLE.values(), ids=UNSENDABLE.keys())
async def test_a_header_http_cannot_carry_is_left_out_and_its_secret_never_shown(
    caplog: pytest.LogCaptureFixture, written: str, warned: str
) -> None:
    """OTEL_EXPORTER_OTLP_HEADERS with an entry HTTP/1.1 cannot carry (a line break or a
    character outside Latin-1 in its value, a token written into its name as in
    ``Authorization: Bearer <token>``): that entry is not sent and the warning shows its name
    only when it is a valid one, never its value; the other headers and the spans are sent."""
    async with Receiver() as receiver:
        exporting = Exporting(
            TracingConfig(enabled=True, endpoint=receiver.url),
            {"OTEL_EXPORTER_OTLP_HEADERS": f"{written},x-api-key=k1"},
        )
        Tracing.end_server(exporting.tracing.server_span("/a", {}, None), 200)
        await exporting.close()
    assert [span.name for span in receiver.spans] == ["POST /a"]
    assert receiver.headers[0]["x-api-key"] == "k1"
    assert "x-bad" not in receiver.headers[0]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert warned in logged
    assert "r1t" not in logged.lower()


class _EveryHeader(Receiver):
    """A receiver that also keeps each request's headers with every value of a repeated name
    (``Receiver.headers`` keeps one value a name)."""

    def __init__(self) -> None:
        super().__init__()
        self.every: list[CIMultiDict[str]] = []

    async def _export(self, request: web.Request) -> web.Response:
        self.every.append(CIMultiDict(request.headers))
        return await super()._export(request)


# A header the exporter sets itself, written into OTEL_EXPORTER_OTLP_HEADERS with a value of
# the user's (each ending "r1t", as a secret would, to show it is never logged).
FRAMING = {
    "Content-Type": "content-type=text/plain%3B r1t",
    "Content-Encoding": "Content-Encoding=deflate-r1t",
    "Content-Length": "content-length=91r1t",
    "Host": "host=collector.r1t.example",
}


@pytest.mark.parametrize(("name", "written"), FRAMING.items(), ids=FRAMING.keys())
async def test_a_header_the_exporter_sets_itself_is_left_out_with_a_warning_naming_it(
    caplog: pytest.LogCaptureFixture, name: str, written: str
) -> None:
    """OTEL_EXPORTER_OTLP_HEADERS naming Content-Type, Content-Encoding, Content-Length or Host
    (any case): the collector sees that header once, as the exporter sets it (the protobuf
    Content-Type OTLP/HTTP asks for, the gzip it compressed with), not the user's beside or
    instead of it; the entry is left out with a warning that names the header and never its
    value, and the other headers and the spans are sent."""
    async with _EveryHeader() as receiver:
        exporting = Exporting(
            TracingConfig(enabled=True, endpoint=receiver.url),
            {
                "OTEL_EXPORTER_OTLP_HEADERS": f"{written},x-api-key=k1",
                "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
            },
        )
        Tracing.end_server(exporting.tracing.server_span("/a", {}, None), 200)
        await exporting.close()
    assert [span.name for span in receiver.spans] == ["POST /a"]
    (headers,) = receiver.every
    assert headers.getall("Content-Type") == ["application/x-protobuf"]
    assert headers.getall("Content-Encoding") == ["gzip"]
    assert headers.getall("Host") == [f"127.0.0.1:{receiver.port}"]
    assert len(headers.getall("Content-Length")) == 1
    assert headers["x-api-key"] == "k1"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert repr(name.lower()) in logged
    assert "set by the exporter itself" in logged
    assert "r1t" not in logged.lower()


@pytest.mark.parametrize(
    ("endpoint", "env", "source"),
    [
        pytest.param(
            "http://collector..internal:4318", {}, "tracing.endpoint", id="an empty DNS label"
        ),
        pytest.param(
            f"http://{'c' * 64}.internal:4318", {}, "tracing.endpoint", id="a label over 63"
        ),
        pytest.param(
            None,
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:43l8/v1/traces"},
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            id="a port that is not a number",
        ),
        pytest.param(
            None,
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "ftp://collector:21"},
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            id="a scheme OTLP/HTTP has not",
        ),
        pytest.param(
            None,
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://user:s3cret@collector..internal"},
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            id="credentials in a bad URL stay unsaid",
        ),
    ],
)
def test_a_collector_url_the_exporter_cannot_post_to_is_refused_at_start(
    endpoint: str | None, env: dict[str, str], source: str
) -> None:
    """A collector URL that would fail in the exporter's thread at every export (a host name
    DNS cannot carry, a port out of range, another scheme) is a configuration error when
    tracing starts, naming the key or variable that gave it and never the URL's secrets."""
    with pytest.raises(ConfigError) as refused:
        Exporting(TracingConfig(enabled=True, endpoint=endpoint), env)
    assert str(refused.value).startswith(f"{source}: ")
    assert "s3cret" not in str(refused.value)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("http://collector..internal:4318/v1/traces", id="the resolver refuses"),
        pytest.param("http://collector:43l8/v1/traces", id="the port cannot be read"),
    ],
)
async def test_an_export_that_fails_unexpectedly_drops_its_spans_and_the_thread_lives_on(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An export that raises what no collector failure was expected to raise (a collector
    given directly, past the check at start) loses that export's spans, logged, and the
    exporter's thread goes on: a thread ended by it would drop every later span silently."""
    resource = Resource.create({"service.name": "waba-gateway"})
    batches = Batches(
        Encoder(resource.attributes, "waba-gateway", "test"),
        Collector(url=url, timeout_s=1.0),
        {"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "1", "OTEL_BSP_SCHEDULE_DELAY": "10"},
    )
    tracing = Tracing(batches.record, 1.0, batches.record_whole)
    thread = next(t for t in threading.enumerate() if t.name == THREAD_NAME and t.is_alive())
    Tracing.end_server(tracing.server_span("/a", {}, None), 200)
    await asyncio.sleep(0.5)  # fifty schedule delays: the export was tried, and failed
    assert thread.is_alive()
    await asyncio.to_thread(batches.shutdown)  # ends the retries' backoff
    assert batches.exported == 0
    assert any("dropped" in r.getMessage() for r in caplog.records)
