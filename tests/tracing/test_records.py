"""The listener's record of a traced notification (SERVER span and outbox commit as one plain
record): the same spans as the API spans, byte for byte, batched by the spans it holds, and
ended by the listener with every status it answers, a rejection before the outbox and a
commit that fails included."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from helpers import eventually, gateway_config, message_body, post, sink_target
from otlp import CLIENT, INTERNAL, SERVER, Receiver
from pki import Pki
from sink import Sink

from gateway.config import Config, OutboxConfig, TracingConfig
from gateway.errors import OutboxError
from gateway.runtime.gateway import Gateway
from gateway.tracing.attributes import server_attributes
from gateway.tracing.encoding import Encoder
from gateway.tracing.export import Exporting
from gateway.tracing.records import Attempts, Ended, Notified
from gateway.tracing.spans import Span, Tracing

FOREIGN = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
ATTRIBUTES = {"http.route": "/webhook", "tls.client.subject": "CN=meta", "client.port": 4}


def _record(
    tracing: Tracing, status: int, stored: list[str] | None, failure: Exception | None
) -> Notified:
    """A record ended as the listener ends one: ``stored`` committed (``None``: a duplicate),
    or ``failure`` failing the commit; ``status`` 401: rejected before the outbox."""
    record = tracing.notified("/webhook", ATTRIBUTES, FOREIGN if status == 200 else None)
    if status != 401:
        record.committing()
        tracing.stored_notified(record)
        if failure is None:
            record.committed(stored)
    tracing.end_notified(record, status, failure)
    return record


@pytest.mark.parametrize(
    ("status", "stored", "failure", "kinds"),
    [
        (200, ["d-1", "d-2"], None, ["outbox commit", "POST /webhook"]),
        (200, None, None, ["outbox commit", "POST /webhook"]),  # a duplicate
        (503, None, OutboxError("disk full"), ["outbox commit", "POST /webhook"]),
        (401, None, None, ["POST /webhook"]),
    ],
)
def test_a_record_encodes_as_the_api_spans_it_stands_for(
    status: int, stored: list[str] | None, failure: Exception | None, kinds: list[str]
) -> None:
    """The exporter's encoding of a record is byte for byte that of the commit and SERVER
    API spans the same record gives a span-only recorder: names, ids, parent, times, the
    connection's and the status's attributes, the commit's count or error, link, flags."""
    as_spans: list[Span] = []
    records: list[Notified | Attempts] = []
    spans_tracing = Tracing(as_spans.append)
    records_tracing = Tracing(as_spans.append, records=records.append)
    record = _record(records_tracing, status, stored, failure)
    assert records == [record]
    spans_tracing.as_spans(record)  # the same record, given as API spans
    assert [span.name for span in as_spans] == kinds
    encoder = Encoder({"service.name": "s"}, "gw", "1")
    for _ in range(2):  # the second time from the caches
        assert encoder.notified(record) == [encoder.span(span) for span in as_spans]
    server = as_spans[-1]
    assert server.error == (status >= 500)
    if failure is not None:
        assert as_spans[0].changed == {"error.type": "OutboxError"}
        assert as_spans[0].error


def test_a_connections_attributes_encode_as_a_plain_mapping_of_them_would() -> None:
    """What a connection's path and certificate give is one mapping for every connection
    with them, and each connection's SERVER span (its constant part encoded once, by an
    encoder that has seen other connections) encodes byte for byte as with a plain dict."""
    not_after = "Jun  1 12:00:00 2027 GMT"
    connections = [
        server_attributes("/webhook", "meta", not_after, "10.0.0.1", ("10.0.0.1", port))
        for port in (40000, 40001, 40000)
    ] + [server_attributes("/webhook", "other", None, "10.0.0.2", ("10.0.0.3", 5))]
    assert connections[0].constant is connections[1].constant
    assert connections[0].constant is not connections[3].constant
    encoder = Encoder({"service.name": "s"}, "gw", "1")
    for attributes in connections:
        spans: list[Span] = []
        tracing = Tracing(spans.append)
        tracing.end_server(tracing.server_span("/webhook", attributes, None), 200)
        (server,) = spans
        encoded = encoder.span(server)
        assert len(dict(attributes)) == len(attributes)  # no key in both parts
        server.attributes = dict(attributes)
        assert encoded == Encoder({"service.name": "s"}, "gw", "1").span(server)


def test_an_unsampled_record_is_not_recorded_but_its_context_says_so() -> None:
    """At sample_ratio 0 nothing is recorded, and the stored context's flags are 00; the
    first attempt finds the same parent as a restarted gateway parsing the text."""
    records: list[Notified | Attempts] = []
    tracing = Tracing(lambda span: None, 0.0, records.append)
    record = tracing.notified("/webhook", {}, None)
    record.committing()
    stored = tracing.stored_notified(record)
    record.committed(["d-1"])
    tracing.end_notified(record, 200)
    assert records == []
    assert stored.endswith("-00")
    (here,) = tracing.attempts("http://t/", "t", [("d-1", stored, 1)]).spans
    (there,) = Tracing(lambda span: None).attempts("http://t/", "t", [("d-1", stored, 1)]).spans
    trace_id, _, parent_id, _, sampled, _, _ = here
    assert (trace_id, parent_id, sampled) == (there[0], there[2], there[4])
    assert parent_id == record.server_id.to_bytes(8)


STORED = f"{FOREIGN}\nvendor=1"
UNSAMPLED = FOREIGN[:-2] + "00"


@pytest.mark.parametrize(
    ("deliveries", "ended"),
    [
        ([("d-1", STORED, 1)], [(200, None, "delivered")]),
        ([("d-1", FOREIGN, 2)], [(200, None, "delivered")]),  # a parent, no tracestate
        ([("d-" + "7" * 300, FOREIGN, 1)], [(200, None, "delivered")]),  # lengths of 2 bytes
        ([("d-1", None, 3), ("d-2", STORED, 2)], [(503, None, "retry"), (404, None, "dead")]),
        ([("d-1", STORED, 1)], [(None, "timed out after 5s", "retry")]),
        ([("d-1", UNSAMPLED, 1), ("d-2", None, 1)], [(None, "stopped", "retry")] * 2),
    ],
)
@pytest.mark.parametrize("kind", ["http", "nats"])
def test_a_batch_of_attempts_encodes_as_the_api_spans_and_carries_their_headers(
    deliveries: list[tuple[str, str | None, int]], ended: list[Ended], kind: str
) -> None:
    """A batch's record encodes, byte for byte, as the CLIENT API spans it stands for
    (an unsampled attempt not at all), and its headers carry each span's own context,
    tracestate included."""
    as_spans: list[Span] = []
    records: list[Notified | Attempts] = []
    tracing = Tracing(as_spans.append, records=records.append)
    record = tracing.attempts(
        "nats://bus:4222" if kind == "nats" else "http://t:1/in", "t", deliveries, kind
    )
    tracing.end_attempts(record, ended)
    tracing.end_attempts(record, ended)  # a second end records nothing more
    assert records == [record]
    Tracing(as_spans.append).as_spans(record)
    sampled = [span for span in record.spans if span[4]]
    assert len(as_spans) == record.count == len(sampled)
    encoder = Encoder({"service.name": "s"}, "gw", "1")
    for _ in range(2):
        assert encoder.attempts(record) == [encoder.span(span) for span in as_spans]
    for (trace_id, span_id, _, state, sampled_, _, _), headers in zip(
        record.spans, record.headers, strict=True
    ):
        flags = "01" if sampled_ else "00"
        assert headers["traceparent"] == f"00-{trace_id.hex()}-{span_id.hex()}-{flags}"
        assert headers.get("tracestate", "") == state
    with_parent = [
        span for span, (_, context, _) in zip(record.spans, deliveries, strict=True) if context
    ]
    assert all(span[0].hex() == FOREIGN[3:35] for span in with_parent)


async def test_a_records_two_spans_are_split_across_batches_and_dropped_together() -> None:
    """OTEL_BSP_MAX_EXPORT_BATCH_SIZE counts spans, not records: at 1 each export holds one
    span; OTEL_BSP_MAX_QUEUE_SIZE counts spans too, and a record that does not fit is dropped
    whole (both its spans counted)."""
    async with Receiver() as receiver:
        exporting = Exporting(
            TracingConfig(enabled=True, endpoint=receiver.url),
            {"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "1", "OTEL_BSP_SCHEDULE_DELAY": "600000"},
        )
        for _ in range(2):
            _record(exporting.tracing, 200, ["d"], None)
        await exporting.close()
    assert [span.kind for span in receiver.spans] == [INTERNAL, SERVER] * 2
    assert len(receiver.raw) == 4
    assert exporting.batches.exported == 4
    async with Receiver() as receiver:
        exporting = Exporting(
            TracingConfig(enabled=True, endpoint=receiver.url),
            {"OTEL_BSP_MAX_QUEUE_SIZE": "3", "OTEL_BSP_SCHEDULE_DELAY": "600000"},
        )
        for _ in range(3):
            _record(exporting.tracing, 200, ["d"], None)
        assert exporting.batches.dropped == 4
        await exporting.close()
    assert [span.kind for span in receiver.spans] == [INTERNAL, SERVER]


def _traced(config: Config, receiver: Receiver) -> Config:
    tracing = TracingConfig(enabled=True, endpoint=receiver.url)
    return dataclasses.replace(config, tracing=tracing)


async def test_the_listener_ends_each_server_span_with_the_status_it_answered(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """A stored notification (200), a bad signature refused before the outbox (401, no
    commit), a commit that fails in the writer (the outbox file moved away: 503) and one the
    closed outbox refuses at once (503): each SERVER span has its status, an error status from
    500 on, and each commit is its child, failed with the error's type."""
    async with Receiver() as receiver:
        config = _traced(gateway_config(pki, tmp_path, targets=[sink_target(sink)]), receiver)
        async with Gateway(config) as gateway:
            assert (await post(gateway, pki, message_body("kept"))).status == 200
            answer = await post(gateway, pki, message_body("forged"), signature="sha256=00")
            assert answer.status == 401
            path = config.outbox.path
            os.rename(path, path.with_name("moved.sqlite3"))
            assert (await post(gateway, pki, message_body("lost"))).status == 503
            os.rename(path.with_name("moved.sqlite3"), path)
            await gateway.outbox.close()
            assert (await post(gateway, pki, message_body("closed"))).status == 503
    servers = receiver.of_kind(SERVER)
    assert [s.attributes["http.response.status_code"] for s in servers] == [200, 401, 503, 503]
    assert [s.status for s in servers] == [0, 0, 2, 2]
    assert [s.attributes.get("error.type") for s in servers] == [None, "401", "503", "503"]
    commits = receiver.of_kind(INTERNAL)
    with_commit = [servers[0], servers[2], servers[3]]
    assert [(c.trace_id, c.parent_id) for c in commits] == [
        (s.trace_id, s.span_id) for s in with_commit
    ]
    assert commits[0].attributes == {"gateway.duplicate": False, "gateway.deliveries": 1}
    assert [c.attributes for c in commits[1:]] == [{"error.type": "OutboxError"}] * 2
    assert [c.status for c in commits] == [0, 2, 2]


async def test_an_outbox_without_accept_soon_gives_the_same_traced_spans(
    pki: Pki, tmp_path: Path, sink: Sink, pg_url: str
) -> None:
    """With the PostgreSQL outbox (no accept_soon: the listener's future is a task there), a
    traced POST still gives its SERVER span, the commit as its child with the count stored,
    and the attempt's CLIENT span in the same trace, parented on the SERVER span."""
    async with Receiver() as receiver:
        config = _traced(gateway_config(pki, tmp_path, targets=[sink_target(sink)]), receiver)
        config = dataclasses.replace(config, outbox=OutboxConfig(url=pg_url))
        async with Gateway(config) as gateway:
            assert (await post(gateway, pki, message_body("shared"))).status == 200
            (request,) = await sink.wait_for(1)
            await eventually(lambda: _delivered(gateway), "the delivery's outcome")
    (server,) = receiver.of_kind(SERVER)
    (commit,) = receiver.of_kind(INTERNAL)
    (client,) = receiver.of_kind(CLIENT)
    assert server.attributes["http.response.status_code"] == 200
    assert (commit.trace_id, commit.parent_id) == (server.trace_id, server.span_id)
    assert commit.attributes == {"gateway.duplicate": False, "gateway.deliveries": 1}
    assert (client.trace_id, client.parent_id) == (server.trace_id, server.span_id)
    assert request.headers["traceparent"].split("-")[1:3] == [client.trace_id, client.span_id]


async def _delivered(gateway: Gateway) -> bool | None:
    counts = await gateway.outbox.counts()
    return True if counts.get("delivered") else None
