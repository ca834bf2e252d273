"""The parts of tracing on their own: W3C trace context, the SERVER span's attributes, spans and
their sampling, the OTLP encoding (decoded with opentelemetry-proto, as a collector would), the
collector's settings from the OTEL_* variables, and the exporter against a real receiver."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.trace import StatusCode
from otlp import Receiver, value_of

from gateway.config import TracingConfig
from gateway.tracing.attributes import server_attributes
from gateway.tracing.collector import Collector, collector_from
from gateway.tracing.context import Parent, parse_stored, parse_traceparent
from gateway.tracing.encoding import Encoder
from gateway.tracing.export import Exporting
from gateway.tracing.spans import CLIENT, SERVER, Span, Tracing

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (f"00-{TRACE}-{PARENT}-01", Parent(bytes.fromhex(TRACE), bytes.fromhex(PARENT), 1)),
        (f" 00-{TRACE}-{PARENT}-00 ", Parent(bytes.fromhex(TRACE), bytes.fromhex(PARENT), 0)),
        (f"01-{TRACE}-{PARENT}-01-later", Parent(bytes.fromhex(TRACE), bytes.fromhex(PARENT), 1)),
        (f"00-{TRACE}-{PARENT}-01-later", None),  # version 00 has nothing after the flags
        (f"ff-{TRACE}-{PARENT}-01", None),
        (f"00-{'0' * 32}-{PARENT}-01", None),
        (f"00-{TRACE}-{'0' * 16}-01", None),
        (f"00-{TRACE.upper()}-{PARENT}-01", None),
        ("00-abc-def-01", None),
        ("", None),
        (None, None),
    ],
)
def test_traceparent_is_read_as_w3c_trace_context_defines_it(
    header: str | None, expected: Parent | None
) -> None:
    """A valid traceparent gives its ids and flags; anything else gives no parent."""
    assert parse_traceparent(header) == expected


def test_stored_context_gives_back_its_tracestate() -> None:
    """The stored form keeps tracestate beside the traceparent."""
    parent = parse_stored(f"00-{TRACE}-{PARENT}-01\nvendor=1")
    assert parent == Parent(bytes.fromhex(TRACE), bytes.fromhex(PARENT), 1, "vendor=1")


@pytest.mark.parametrize(
    ("client", "peer", "expected"),
    [
        (
            "203.0.113.5",
            ("203.0.113.5", 40100),
            {
                "client.address": "203.0.113.5",
                "client.port": 40100,
                "network.peer.address": "203.0.113.5",
                "network.peer.port": 40100,
            },
        ),
        (  # behind a load balancer (PROXY protocol): the client's port is not known
            "203.0.113.5",
            ("10.0.0.2", 51000),
            {
                "client.address": "203.0.113.5",
                "network.peer.address": "10.0.0.2",
                "network.peer.port": 51000,
            },
        ),
        (
            "2001:db8::5",
            ("2001:db8::5", 443, 0, 0),
            {
                "client.address": "2001:db8::5",
                "client.port": 443,
                "network.peer.address": "2001:db8::5",
                "network.peer.port": 443,
            },
        ),
        (None, None, {}),
    ],
)
def test_server_span_names_the_client_and_the_tcp_peer(
    client: str | None, peer: object, expected: dict[str, Any]
) -> None:
    """client.address is the client (a PROXY header's, else the peer), network.peer.* the TCP
    peer; client.port only where the client is the peer."""
    found = server_attributes("/webhook", "meta", None, client, peer)
    addresses = {k: v for k, v in found.items() if k.startswith(("client.", "network.peer."))}
    assert addresses == expected


def _tracing(ratio: float = 1.0) -> tuple[Tracing, list[Span]]:
    recorded: list[Span] = []
    return Tracing(recorded.append, ratio), recorded


def test_a_notifications_spans_are_one_trace_and_its_attempt_carries_it() -> None:
    """SERVER, commit and CLIENT spans share one trace; the attempt's headers carry its own
    span id; each span is recorded once, at its end."""
    tracing, recorded = _tracing()
    server = tracing.server_span("/webhook", {}, f"00-{TRACE}-{PARENT}-01")
    commit = tracing.commit_span(server)
    stored = tracing.stored(server)
    commit.end()
    Tracing.end_server(server, 200)
    server.end()  # a second end records nothing more
    attempts = tracing.attempts("http://t:1/", "t", [("d-1", stored, 2)])
    tracing.end_attempts(attempts, [(503, None, "retry")])
    attempt = recorded[-1]
    (headers,) = attempts.headers
    assert recorded == [commit, server, attempt]
    assert server.parent_id == b""
    assert server.links[0][0].hex() == TRACE
    assert (commit.trace_id, commit.parent_id) == (server.trace_id, server.span_id)
    assert (attempt.trace_id, attempt.parent_id) == (server.trace_id, server.span_id)
    assert headers == {"traceparent": f"00-{attempt.trace_id.hex()}-{attempt.span_id.hex()}-01"}
    assert attempt.error
    assert not server.error
    assert attempt.changed == {
        "gateway.delivery.id": "d-1",
        "gateway.delivery.attempt": 2,
        "http.request.resend_count": 1,
        "http.response.status_code": 503,
        "error.type": "503",
        "gateway.delivery.outcome": "retry",
    }


def test_unsampled_traces_record_nothing_but_still_carry_their_context() -> None:
    """At sample_ratio 0 no span is recorded; the stored context and the attempt's headers
    say "not sampled" (flags 00), so the target does not record either."""
    tracing, recorded = _tracing(0.0)
    server = tracing.server_span("/webhook", {}, None)
    stored = tracing.stored(server)
    assert stored is not None
    assert stored.endswith("-00")
    Tracing.end_server(server, 200)
    attempts = tracing.attempts("http://t:1/", "t", [("d-1", stored, 1)])
    tracing.end_attempts(attempts, [(200, None, "delivered")])
    assert recorded == []
    assert attempts.headers[0]["traceparent"].endswith("-00")
    assert attempts.count == 0


def test_an_attempt_without_stored_context_is_a_root_and_keeps_a_tracestate() -> None:
    """No stored context: a root of its own; a stored tracestate goes on with the attempt."""
    tracing, recorded = _tracing()
    attempts = tracing.attempts(
        "redis://cache:6379",
        "bus",
        [("d-1", None, 1), ("d-2", f"00-{TRACE}-{PARENT}-01\nk=v", 1)],
        "redis",
    )
    tracing.end_attempts(attempts, [(None, "stopped", "retry")] * 2)
    root, child = recorded
    headers = attempts.headers[1]
    assert root.parent_id == b""
    assert root.name == "send bus"
    assert root.kind == CLIENT
    assert child.trace_id.hex() == TRACE
    assert headers["tracestate"] == "k=v"


def _decode(body: bytes) -> tuple[dict[str, Any], list[Any]]:
    (resource_spans,) = ExportTraceServiceRequest.FromString(body).resource_spans
    resource = {a.key: value_of(a.value) for a in resource_spans.resource.attributes}
    (scope_spans,) = resource_spans.scope_spans
    assert (scope_spans.scope.name, scope_spans.scope.version) == ("gw", "9.9")
    return resource, list(scope_spans.spans)


def test_encoding_is_what_opentelemetry_proto_decodes() -> None:
    """Ids, parent, name, kind, times, every attribute type, a changed attribute, a link,
    the error status and the flags, as the generated protobuf classes read them."""
    tracing, recorded = _tracing()
    shared = {"s": "text", "b": True, "i": -3, "f": 0.5, "seq": ["a", "b"], "changed": "old"}
    server = tracing.server_span("/webhook", shared, f"00-{TRACE}-{PARENT}-01")
    server.set_attribute("changed", "new")
    server.set_status(StatusCode.ERROR)
    server.end()
    commit = tracing.commit_span(server)
    commit.end()
    encoder = Encoder({"service.name": "svc", "n": 2}, "gw", "9.9")
    for _ in range(2):  # the second time from the caches
        resource, (first, second) = _decode(encoder.encode(recorded))
        assert resource == {"service.name": "svc", "n": 2}
        assert first.trace_id == server.trace_id
        assert first.span_id == server.span_id
        assert (first.name, first.kind, first.parent_span_id) == ("POST /webhook", SERVER, b"")
        assert (first.start_time_unix_nano, first.end_time_unix_nano) == (
            server.start_ns,
            server.end_ns,
        )
        attributes = {a.key: a.value for a in first.attributes}
        assert {k: value_of(v) for k, v in attributes.items() if k != "seq"} == {
            "s": "text",
            "b": True,
            "i": -3,
            "f": 0.5,
            "changed": "new",
        }
        assert [v.string_value for v in attributes["seq"].array_value.values] == ["a", "b"]
        (link,) = first.links
        assert (link.trace_id.hex(), link.span_id.hex()) == (TRACE, PARENT)
        assert {a.key: value_of(a.value) for a in link.attributes} == {"gateway.link": "untrusted"}
        assert first.status.code == 2  # STATUS_CODE_ERROR
        assert first.flags == 0x01
        assert second.parent_span_id == server.span_id
        assert second.flags == 0x101  # sampled; the parent is known to be local
        assert second.status.code == 0


@pytest.mark.parametrize(
    ("endpoint", "env", "expected"),
    [
        (None, {}, Collector(url="http://localhost:4318/v1/traces")),
        (
            "http://file:4318/",
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://env/x"},
            Collector(url="http://file:4318/v1/traces"),
        ),
        (
            None,
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "https://base:4318",
                "OTEL_EXPORTER_OTLP_HEADERS": "api-key=abc%20def,x-team=edge",
                "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "2500",
                "OTEL_EXPORTER_OTLP_TIMEOUT": "7000",
                "OTEL_EXPORTER_OTLP_COMPRESSION": "GZIP",
                "OTEL_EXPORTER_OTLP_CERTIFICATE": "/etc/ca.pem",
            },
            Collector(
                url="https://base:4318/v1/traces",
                headers={"api-key": "abc def", "x-team": "edge"},
                timeout_s=2.5,
                compression="gzip",
                ca_file="/etc/ca.pem",
            ),
        ),
        (
            None,
            {
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:1234/custom",
                "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "a=1",
                "OTEL_EXPORTER_OTLP_HEADERS": "b=2",
                "OTEL_EXPORTER_OTLP_COMPRESSION": "brotli",
            },
            Collector(url="http://traces:1234/custom", headers={"a": "1"}),
        ),
    ],
)
def test_collector_settings_follow_the_otel_variables(
    endpoint: str | None, env: dict[str, str], expected: Collector
) -> None:
    """[tracing] endpoint first, then the signal's variables, then the general ones; an
    unknown compression is none."""
    assert collector_from(endpoint, env) == expected


@pytest.mark.parametrize(
    ("env", "timeout_s"),
    [
        ({}, 10.0),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "250"}, 0.25),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "10000"}, 10.0),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "1.5"}, 0.0015),
        ({"OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "3000", "OTEL_EXPORTER_OTLP_TIMEOUT": "9"}, 3.0),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "soon"}, 10.0),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "0"}, 10.0),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "-5"}, 10.0),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "nan"}, 10.0),
        ({"OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "inf"}, 10.0),
    ],
)
def test_otlp_timeout_variables_are_milliseconds(env: dict[str, str], timeout_s: float) -> None:
    """OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT is read in milliseconds, as the specification says;
    what is not a positive number leaves the default of 10 s."""
    assert collector_from("http://c:4318", env).timeout_s == pytest.approx(timeout_s)


async def test_exporter_posts_with_the_configured_headers_and_compression() -> None:
    """OTEL_EXPORTER_OTLP_HEADERS, gzip compression and OTEL_BSP_MAX_EXPORT_BATCH_SIZE reach
    a real receiver, which decodes every span; the exports share one connection; closing
    flushes what waits."""
    async with Receiver() as receiver:
        env = {
            "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=k1",
            "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "1",
        }
        exporting = Exporting(
            TracingConfig(enabled=True, endpoint=receiver.url, service_name="parts"), env
        )
        for _ in range(3):
            Tracing.end_server(exporting.tracing.server_span("/w", {}, None), 200)
        await exporting.close()
    assert [span.name for span in receiver.spans] == ["POST /w"] * 3
    assert {span.service for span in receiver.spans} == {"parts"}
    assert len(receiver.raw) == 3
    assert receiver.connections == 1
    assert receiver.headers[0]["x-api-key"] == "k1"
    assert receiver.headers[0]["content-encoding"] == "gzip"


async def test_a_collector_that_refuses_an_export_loses_that_batch_only() -> None:
    """A 400 is not retried: the batch is dropped with a warning, and the next is sent."""
    async with Receiver(refuse=1) as receiver:
        exporting = Exporting(
            TracingConfig(enabled=True, endpoint=receiver.url),
            {"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "1"},
        )
        for path in ("/first", "/second"):
            Tracing.end_server(exporting.tracing.server_span(path, {}, None), 200)
        await exporting.close()
    assert [span.name for span in receiver.spans] == ["POST /second"]
    assert exporting.batches.exported == 1


async def test_spans_the_collector_refuses_are_counted_as_dropped_and_said_so_at_shutdown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A batch the collector refuses (400: not retried) is lost: its spans count among the
    dropped, and the warning at shutdown gives the collector as the reason, not the queue."""
    async with Receiver(refuse=1) as receiver:
        exporting = Exporting(
            TracingConfig(enabled=True, endpoint=receiver.url),
            {"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "2", "OTEL_BSP_SCHEDULE_DELAY": "600000"},
        )
        for path in ("/a", "/b", "/c"):
            Tracing.end_server(exporting.tracing.server_span(path, {}, None), 200)
        await exporting.close()
    assert [span.name for span in receiver.spans] == ["POST /c"]
    assert (exporting.batches.dropped, exporting.batches.exported) == (2, 1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "2 spans were dropped: the collector did not take them" in warnings
    assert not any("queue" in message for message in warnings)


async def test_the_shutdown_warning_counts_each_reason_spans_were_dropped_for(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Spans past OTEL_BSP_MAX_QUEUE_SIZE and spans the collector refused (it answers 400 to
    every export here) are both dropped: the total, and how many for each reason."""
    async with Receiver(refuse=100) as receiver:
        exporting = Exporting(
            TracingConfig(enabled=True, endpoint=receiver.url),
            {"OTEL_BSP_MAX_QUEUE_SIZE": "4", "OTEL_BSP_SCHEDULE_DELAY": "600000"},
        )
        for number in range(10):
            Tracing.end_server(exporting.tracing.server_span(f"/{number}", {}, None), 200)
        overflowed = exporting.batches.dropped  # the collector, on this loop, has not answered
        assert 2 <= overflowed <= 6
        await exporting.close()
    assert receiver.spans == []
    assert (exporting.batches.dropped, exporting.batches.exported) == (10, 0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        f"10 spans were dropped: {overflowed} as the export queue was full,"
        f" {10 - overflowed} as the collector did not take them"
    ) in warnings


async def test_closing_exports_every_span_still_queued() -> None:
    """Spans that wait for the schedule delay (here ten minutes) are not lost at shutdown: the
    close exports them all, in one request."""
    async with Receiver() as receiver:
        exporting = Exporting(
            TracingConfig(enabled=True, endpoint=receiver.url),
            {"OTEL_BSP_SCHEDULE_DELAY": "600000"},
        )
        for number in range(5):
            Tracing.end_server(exporting.tracing.server_span(f"/{number}", {}, None), 200)
        await asyncio.sleep(0.2)
        assert receiver.raw == []  # less than a batch, long before the delay: still queued
        await exporting.close()
    assert [span.name for span in receiver.spans] == [f"POST /{n}" for n in range(5)]
    assert len(receiver.raw) == 1
    assert exporting.batches.exported == 5


async def test_spans_beyond_the_queue_size_are_dropped_and_counted_never_waited_for(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """OTEL_BSP_MAX_QUEUE_SIZE bounds what waits for export, and the request path never waits
    for the exporter: here the collector cannot answer (it runs on this event loop, busy ending
    the spans), so the exporter takes one batch at most and the spans past the queue's bound
    are dropped, counted, warned of once, then in total at shutdown."""
    async with Receiver() as receiver:
        exporting = Exporting(
            TracingConfig(enabled=True, endpoint=receiver.url),
            {"OTEL_BSP_MAX_QUEUE_SIZE": "4", "OTEL_BSP_SCHEDULE_DELAY": "600000"},
        )
        for number in range(10):
            Tracing.end_server(exporting.tracing.server_span(f"/{number}", {}, None), 200)
        dropped = exporting.batches.dropped
        assert 2 <= dropped <= 6  # 4 queued, and at most one batch of 4 taken meanwhile
        await exporting.close()
    names = [span.name for span in receiver.spans]
    assert names[:4] == [f"POST /{n}" for n in range(4)]
    assert len(names) == exporting.batches.exported == 10 - dropped
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("dropping" in message for message in warnings) == 1
    assert f"{dropped} spans were dropped: the export queue was full" in warnings


@pytest.mark.parametrize("ratio", [1.0, 0.0])
def test_an_attempt_has_the_same_parent_in_the_storing_process_and_after_a_restart(
    ratio: float,
) -> None:
    """The parent an attempt finds among the contexts stored moments before is the one the
    stored text gives a process that never saw it (a restart, another gateway)."""
    storing, _ = _tracing(ratio)
    stored = storing.stored(storing.server_span("/w", {}, None))
    assert stored is not None
    here = storing.attempts("http://t/", "t", [("d1", stored, 1)])
    restarted, _ = _tracing(ratio)
    there = restarted.attempts("http://t/", "t", [("d1", stored, 1)])
    ((trace_id, _, parent_id, state, sampled, _, _),) = here.spans
    assert (trace_id, parent_id, state, sampled) == there.spans[0][:1] + there.spans[0][2:5]
    (here_headers,), (there_headers,) = here.headers, there.headers
    assert here_headers["traceparent"][:36] == there_headers["traceparent"][:36] == stored[:36]
    assert here_headers["traceparent"][-2:] == stored[-2:] == ("01" if ratio else "00")
