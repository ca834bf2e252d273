"""The exporter against collectors that misbehave, on loopback: one that takes the connection and
never answers, one whose answer never ends, one that takes only part of an export. Whatever the
collector does, closing ends within the flush's time limit, memory stays bounded, and every span
is either exported or counted and logged as dropped."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from aiohttp import web
from helpers import eventually
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceResponse,
)
from otlp import Receiver

from gateway.config import TracingConfig
from gateway.tracing.export import THREAD_NAME, Exporting
from gateway.tracing.spans import Tracing


@pytest.fixture
def silent_collector() -> Iterator[str]:
    """The URL of a collector that never answers: its socket listens (the kernel completes
    each handshake and takes the request into its buffer) but never accepts a connection."""
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(8)
        yield f"http://127.0.0.1:{listening.getsockname()[1]}"


def _exporter_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == THREAD_NAME and t.is_alive()}


def _end_spans(exporting: Exporting, count: int) -> None:
    for number in range(count):
        Tracing.end_server(exporting.tracing.server_span(f"/{number}", {}, None), 200)


async def _export_and_close(endpoint: str, spans: int, environment: dict[str, str]) -> Exporting:
    """An exporter to ``endpoint``, set by ``environment``, that ends ``spans`` spans and is
    then closed (as the gateway closes it when it stops)."""
    exporting = Exporting(TracingConfig(enabled=True, endpoint=endpoint), environment)
    _end_spans(exporting, spans)
    await exporting.close()
    return exporting


async def test_closing_against_a_collector_that_never_answers_ends_in_time_and_counts_all(
    silent_collector: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A collector that never answers (each post would wait 30 s for it): closing returns
    within OTEL_BSP_EXPORT_TIMEOUT and a little more, the exporter's thread has ended (it
    does not go on posting after the close), and every span is counted as dropped, each for
    its reason: the one in flight as not taken, those still queued as out of time."""
    before = _exporter_threads()
    exporting = Exporting(
        TracingConfig(enabled=True, endpoint=silent_collector),
        {
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "1",
            "OTEL_BSP_SCHEDULE_DELAY": "600000",
            "OTEL_BSP_EXPORT_TIMEOUT": "500",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "30000",
        },
    )
    (thread,) = _exporter_threads() - before
    _end_spans(exporting, 3)
    await asyncio.sleep(0.2)  # the first span's export is under way, and waits
    started = time.monotonic()
    await exporting.close()
    assert time.monotonic() - started < 3.0
    thread.join(0.5)  # at most a moment for the thread to leave, once closing returned
    assert not thread.is_alive()
    assert (exporting.batches.exported, exporting.batches.dropped) == (0, 3)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        "3 spans were dropped: 1 as the collector did not take them,"
        " 2 as the flush ran out of time (OTEL_BSP_EXPORT_TIMEOUT)"
    ) in warnings


async def test_closing_while_a_tls_handshake_never_ends_counts_all_and_counts_once(
    silent_collector: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An https collector that never answers the TLS handshake (the one step whose socket a
    close cannot shut from outside): closing still returns in time, with every span counted
    as out of time; the thread, ended later by its own timeout, counts none of them again."""
    before = _exporter_threads()
    exporting = Exporting(
        TracingConfig(enabled=True, endpoint=silent_collector.replace("http:", "https:")),
        {
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "1",
            "OTEL_BSP_SCHEDULE_DELAY": "600000",
            "OTEL_BSP_EXPORT_TIMEOUT": "500",
            # Well past the close's time limit and its second of waiting for the thread.
            "OTEL_EXPORTER_OTLP_TIMEOUT": "3000",
        },
    )
    (thread,) = _exporter_threads() - before
    _end_spans(exporting, 3)
    await asyncio.sleep(0.2)
    started = time.monotonic()
    await exporting.close()
    assert time.monotonic() - started < 3.0
    assert (exporting.batches.exported, exporting.batches.dropped) == (0, 3)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "3 spans were dropped: the flush ran out of time (OTEL_BSP_EXPORT_TIMEOUT)" in warnings
    await asyncio.to_thread(thread.join, 5.0)  # the handshake's own timeout ends it
    assert not thread.is_alive()
    assert (exporting.batches.exported, exporting.batches.dropped) == (0, 3)


class _EndlessAnswer(Receiver):
    """A collector that takes each export and answers 200 with a body that never ends (until
    the client goes away, or 20 s pass)."""

    async def _export(self, request: web.Request) -> web.StreamResponse:
        await super()._export(request)  # decoded and kept, as any export
        answer = web.StreamResponse(status=200)
        answer.enable_chunked_encoding()
        await answer.prepare(request)
        chunk = b"\0" * 16384
        deadline = time.monotonic() + 20
        try:
            while time.monotonic() < deadline:
                await answer.write(chunk)
                await asyncio.sleep(0.001)
        except ConnectionError:
            pass  # the exporter read what it needed and closed the connection
        return answer


async def test_an_answer_that_never_ends_is_read_only_so_far_and_the_export_counts() -> None:
    """A collector whose 200 answer goes on forever: the exporter reads a bounded part of it
    (memory stays bounded), takes the export as done, and sends the next one on a new
    connection, well within the flush's time limit."""
    async with _EndlessAnswer() as receiver:
        exporting = await _export_and_close(
            receiver.url,
            2,
            {"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "1", "OTEL_BSP_EXPORT_TIMEOUT": "3000"},
        )
    assert [span.name for span in receiver.spans] == ["POST /0", "POST /1"]
    assert (exporting.batches.exported, exporting.batches.dropped) == (2, 0)
    assert receiver.connections == 2


class _PartialSuccess(Receiver):
    """A collector that takes every export but rejects one span of each (OTLP's partial
    success: 200, with the number rejected and why)."""

    async def _export(self, request: web.Request) -> web.StreamResponse:
        await super()._export(request)
        partial = ExportTracePartialSuccess(rejected_spans=1, error_message="span too large\n")
        return web.Response(
            body=ExportTraceServiceResponse(partial_success=partial).SerializeToString(),
            content_type="application/x-protobuf",
        )


async def test_spans_a_collector_rejects_in_a_partial_success_are_counted_as_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 200 whose partial_success names rejected spans (OTLP/HTTP, "Partial Success"): those
    count as dropped, not exported, and a warning says how many and the collector's reason
    (its text on one line); the request is not retried, as the specification asks."""
    async with _PartialSuccess() as receiver:
        exporting = await _export_and_close(
            receiver.url,
            2,
            {"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "2", "OTEL_BSP_SCHEDULE_DELAY": "600000"},
        )
    assert len(receiver.raw) == 1
    assert (exporting.batches.exported, exporting.batches.dropped) == (1, 1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("rejected 1 of 2 spans" in w and "'span too large\\n'" in w for w in warnings), (
        warnings
    )
    assert "1 spans were dropped: the collector did not take them" in warnings


class _Throttling(Receiver):
    """A collector that answers the first export 503 with the Retry-After ``retry_after``
    makes, then takes each; ``times`` keeps when each request came."""

    def __init__(self, retry_after: Callable[[], str]) -> None:
        super().__init__()
        self._retry_after = retry_after
        self.times: list[float] = []

    async def _export(self, request: web.Request) -> web.StreamResponse:
        self.times.append(time.monotonic())
        if len(self.times) == 1:
            await request.read()
            return web.Response(status=503, headers={"Retry-After": self._retry_after()})
        return await super()._export(request)


def _in_4_s() -> str:
    """An HTTP-date 4 s from now (whole seconds: 3 to 4 s away when it is read)."""
    return email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=4), usegmt=True)


@pytest.mark.parametrize(
    "retry_after",
    [pytest.param(lambda: "3", id="delay-seconds"), pytest.param(_in_4_s, id="HTTP-date")],
)
async def test_a_collector_that_asks_to_wait_is_retried_no_sooner_than_it_asked(
    retry_after: Callable[[], str],
) -> None:
    """503 with Retry-After (OTLP/HTTP: the client SHOULD honour it, where the exponential
    backoff alone would try again after about a second), as seconds or as a date: the retry
    waits the 3 s asked for, or more, and the export is taken."""
    async with _Throttling(retry_after) as receiver:
        exporting = Exporting(
            TracingConfig(enabled=True, endpoint=receiver.url),
            {"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "1"},
        )
        _end_spans(exporting, 1)

        async def retried() -> bool:
            return len(receiver.times) == 2

        await eventually(retried, "the export to be tried again")
        await exporting.close()
    first, second = receiver.times
    assert second - first >= 2.9
    assert [span.name for span in receiver.spans] == ["POST /0"]
    assert exporting.batches.exported == 1
