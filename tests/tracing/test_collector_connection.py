"""The exporter's connection to the collector against real loopback receivers: TLS to a
collector trusted through OTEL_EXPORTER_OTLP_CERTIFICATE, and headers that would break the
request's framing, or that the exporter sets itself, left out."""

from __future__ import annotations

import asyncio
import base64
import ssl
import threading
from pathlib import Path

import pytest
import trustme
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from multidict import CIMultiDict
from opentelemetry.sdk.resources import Resource
from otlp import Receiver

from gateway.config import TracingConfig
from gateway.errors import CertificateError, ConfigError
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

    async def _export(self, request: web.Request) -> web.StreamResponse:
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
        pytest.param(
            # A token with a "/" not percent-encoded: the authority ends there, and what
            # urlsplit takes for the port is the token's first part.
            None,
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://user:s3cret/Zm9v@collector:4318"},
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            id="a password with a slash stays unsaid",
        ),
        pytest.param(
            None,
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://user:s3cret\uff20x@collector/v1"},
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            id="a password with a full-width at sign stays unsaid",
        ),
        pytest.param(
            # Read as host "edge", port 1234: the rest of the password would go out as the
            # request's path, to that host.
            "https://edge:1234/5678s3cret@collector:4318",
            {},
            "tracing.endpoint",
            id="a password of digits then a slash is neither posted nor said",
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


def _tls_files(folder: Path) -> dict[str, Path]:
    """A CA, a client certificate and its key, an encrypted copy of that key, another key,
    and a file that is no PEM at all, written into ``folder``."""
    ca = trustme.CA()
    client = ca.issue_cert("gateway.internal")
    other = trustme.CA().issue_cert("other.internal")
    key = serialization.load_pem_private_key(client.private_key_pem.bytes(), password=None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    contents = {
        "ca": ca.cert_pem.bytes(),
        "cert": client.cert_chain_pems[0].bytes(),
        "key": client.private_key_pem.bytes(),
        "encrypted": encrypted,
        "other_key": other.private_key_pem.bytes(),
        "not_pem": b"not a certificate\n",
    }
    files = {name: folder / f"{name}.pem" for name in contents}
    for name, data in contents.items():
        files[name].write_bytes(data)
    return files


# Each: the variables (a file by its name in _tls_files, or "missing"), and the start of the
# message: the variable at fault, then why.
UNUSABLE = {
    "a CA file that is not there": (
        {"OTEL_EXPORTER_OTLP_CERTIFICATE": "missing"},
        "OTEL_EXPORTER_OTLP_CERTIFICATE = ",
        "cannot read",
    ),
    "a CA file with no certificate": (
        {"OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": "not_pem"},
        "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE = ",
        "no PEM certificate found",
    ),
    "a client certificate that is not there": (
        {
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": "missing",
            "OTEL_EXPORTER_OTLP_CLIENT_KEY": "key",
        },
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE = ",
        "cannot read",
    ),
    "an encrypted client key (no one to type its passphrase)": (
        {
            "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE": "cert",
            "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY": "encrypted",
        },
        "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY = ",
        "the key is encrypted",
    ),
    "a client key of another certificate": (
        {
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": "cert",
            "OTEL_EXPORTER_OTLP_CLIENT_KEY": "other_key",
        },
        "OTEL_EXPORTER_OTLP_CLIENT_KEY = ",
        "does not match OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
    ),
}


@pytest.mark.parametrize(("given", "variable", "why"), UNUSABLE.values(), ids=UNUSABLE.keys())
def test_an_otlp_tls_file_that_cannot_be_used_stops_the_start_naming_its_variable(
    tmp_path: Path, given: dict[str, str], variable: str, why: str
) -> None:
    """OTEL_EXPORTER_OTLP_[TRACES_]CERTIFICATE, _CLIENT_CERTIFICATE or _CLIENT_KEY naming a
    file that is not there, holds no PEM certificate, is an encrypted key or the key of
    another certificate: a CertificateError at start naming the variable and the file, as a
    target's TLS files are refused (never OpenSSL's bare error, nor its prompt for a
    passphrase on the terminal of an unattended gateway); no exporter thread is left."""
    files = _tls_files(tmp_path)
    env = {name: str(files.get(file, tmp_path / file)) for name, file in given.items()}
    before = {t for t in threading.enumerate() if t.name == THREAD_NAME}
    with pytest.raises(CertificateError) as refused:
        Exporting(TracingConfig(enabled=True, endpoint="https://127.0.0.1:4318"), env)
    message = str(refused.value)
    assert message.startswith(variable), message
    assert why in message
    assert {t for t in threading.enumerate() if t.name == THREAD_NAME} == before


async def test_a_client_certificate_file_that_holds_its_key_too_is_used_as_it_is(
    tmp_path: Path,
) -> None:
    """OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE alone, its file holding the key as well (as
    OpenTelemetry's exporters take it): the collector that asks for a client certificate gets
    it, and the spans."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca.configure_trust(server_context)
    server_context.verify_mode = ssl.CERT_REQUIRED
    ca_file, both = tmp_path / "ca.pem", tmp_path / "client.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ca.issue_cert("gateway.internal").private_key_and_cert_chain_pem.write_to_path(str(both))
    async with Receiver(tls=server_context) as receiver:
        exporting = Exporting(
            TracingConfig(enabled=True, endpoint=receiver.url),
            {
                "OTEL_EXPORTER_OTLP_CERTIFICATE": str(ca_file),
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": str(both),
            },
        )
        Tracing.end_server(exporting.tracing.server_span("/a", {}, None), 200)
        await exporting.close()
    assert [span.name for span in receiver.spans] == ["POST /a"]


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param("", "Basic " + base64.b64encode(b"edge:p@ss w0rd").decode(), id="the URL's"),
        pytest.param("Authorization=Bearer t0ken", "Bearer t0ken", id="a header given wins"),
    ],
)
async def test_credentials_in_the_collector_url_are_sent_as_basic_auth_and_never_shown(
    caplog: pytest.LogCaptureFixture, headers: str, expected: str
) -> None:
    """A collector URL with a user name and password (percent-encoded, as a URL has them)
    authenticates with them, as OpenTelemetry's own OTLP/HTTP exporter does (HTTP Basic,
    RFC 7617), rather than posting without them and having every export refused; an
    Authorization header given in OTEL_EXPORTER_OTLP_HEADERS is sent instead. Neither the
    password nor the header reaches a log line."""
    async with Receiver() as receiver:
        endpoint = receiver.url.replace("http://", "http://edge:p%40ss%20w0rd@")
        exporting = Exporting(
            TracingConfig(enabled=True, endpoint=endpoint),
            {"OTEL_EXPORTER_OTLP_HEADERS": headers},
        )
        Tracing.end_server(exporting.tracing.server_span("/a", {}, None), 200)
        await exporting.close()
    assert [span.name for span in receiver.spans] == ["POST /a"]
    assert receiver.headers[0]["authorization"] == expected
    assert receiver.headers[0]["host"] == f"127.0.0.1:{receiver.port}"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "p@ss" not in logged
    assert "p%40ss" not in logged
    assert "t0ken" not in logged
