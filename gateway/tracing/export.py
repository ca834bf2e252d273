"""Exporting the spans of one gateway process: a queue the spans join as they end, and one
thread that encodes them in batches (:mod:`gateway.tracing.encoding`) and posts them to the
collector (:mod:`gateway.tracing.collector`).

Rule: imported only when ``[tracing] enabled = true`` (the configuration refuses that without
the ``otel`` extra), so a gateway without tracing starts no exporter thread and opens no
connection. A span, or a record of several (:mod:`gateway.tracing.records`), is queued as it
ends, as it is (the event loop's whole part: one append); the exporter's thread encodes a batch
in one pass (:mod:`gateway.tracing.encoding`) and posts
it. It wakes once per batch (a full batch, or the schedule delay), never per span: each wake-up
of a second thread costs the event loop a hand-over of the interpreter's lock. The batching
follows the SDK's batch span processor and its variables: ``OTEL_BSP_SCHEDULE_DELAY`` (ms
between exports), ``..._MAX_QUEUE_SIZE`` (spans held at most; more are dropped and counted,
as are those the collector did not take), ``..._MAX_EXPORT_BATCH_SIZE`` (an export starts
early once this many wait; every limit counts spans, a record's spans are kept or dropped
together, and may be split between two exports), ``..._EXPORT_TIMEOUT`` (ms a final flush may
take: past it, what is still queued or under way is given up on, counted and logged, and the
thread ends; a close never waits on a collector that does not answer). The resource is the
SDK's (``service.name``, ``service.version``, ``OTEL_RESOURCE_ATTRIBUTES``). The tracer is the
gateway's own, never the global one: a program that embeds the callback keeps its own tracing
set-up.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import threading
import time
from collections.abc import Mapping

from opentelemetry.sdk.resources import Resource

from gateway.config import TracingConfig
from gateway.tracing.collector import Collector, Poster, collector_from
from gateway.tracing.encoding import Encoder
from gateway.tracing.records import Attempts, Notified
from gateway.tracing.spans import Span, Tracing
from gateway.version import __version__

__all__ = ["Batches", "Exporting"]

log = logging.getLogger(__name__)

# The SDK's batch span processor's defaults.
_DEFAULTS = {
    "OTEL_BSP_SCHEDULE_DELAY": 5000,
    "OTEL_BSP_MAX_QUEUE_SIZE": 2048,
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": 512,
    "OTEL_BSP_EXPORT_TIMEOUT": 30000,
}
THREAD_NAME = "OtelSpanExporter"
# How long a close waits, past the final flush's time limit, for the exporter's thread to leave
# once the post it was blocked in is ended (Poster.abort): a moment, unless it is blocked where
# no socket can be shut (a name lookup, a connection being made).
_ABORT_WAIT_S = 1.0


def _setting(env: Mapping[str, str], name: str) -> int:
    raw = env.get(name)
    if raw:
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value > 0:
            return value
        log.warning("%s = %r is not a positive integer; using %d", name, raw, _DEFAULTS[name])
    return _DEFAULTS[name]


class Batches:
    """The spans waiting for export, and the thread that sends them."""

    def __init__(self, encoder: Encoder, collector: Collector, env: Mapping[str, str]) -> None:
        self._encoder = encoder
        self._delay_s = _setting(env, "OTEL_BSP_SCHEDULE_DELAY") / 1000
        self._max_queued = _setting(env, "OTEL_BSP_MAX_QUEUE_SIZE")
        self._batch = min(_setting(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE"), self._max_queued)
        self._flush_s = _setting(env, "OTEL_BSP_EXPORT_TIMEOUT") / 1000
        # Spans as they ended, and the listener's records (two spans each), encoded by this
        # thread a batch at a time: the event loop's turn for a request does not carry the
        # encoding (bench/README.md, "Issue 24: where tracing's CPU goes").
        self._queue: collections.deque[Span | Notified | Attempts] = collections.deque()
        # The spans queued, as the difference of two counts each written by one thread only
        # (no lock): the event loop's, of what it queued, and this thread's, of what it took.
        self._queued_spans = 0
        self._taken_spans = 0
        self._pending: list[bytes] = []  # encoded, beyond the last batch posted (this thread's)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._poster = Poster(collector, self._stopping)
        # The spans dropped, by why: each count written by one thread only (the queue's bound
        # by the event loop's, the rest by this one), so no two threads add to one count.
        self._overflowed = 0  # past OTEL_BSP_MAX_QUEUE_SIZE
        self._unencodable = 0  # an attribute OTLP has no encoding for
        self._not_taken = 0  # the collector refused them, or never answered through the retries
        self._failed = 0  # the export raised
        self._late = 0  # still queued when the final flush's time ran out
        # Under way when a close stopped waiting for this thread (written by that close's
        # thread, once this one counts nothing more: _given_up).
        self._abandoned = 0
        self._given_up = False
        # The final flush's end (time.monotonic()), set by shutdown(): no post goes past it.
        self._deadline = math.inf
        self.exported = 0
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        """The spans that will never reach the collector, whatever the reason."""
        lost = self._unencodable + self._not_taken + self._failed + self._late
        return lost + self._overflowed + self._abandoned

    def _counted(self) -> int:
        """The spans queued whose fate this thread has counted: exported, or lost."""
        return self.exported + self._unencodable + self._not_taken + self._failed + self._late

    def record(self, span: Span) -> None:
        """Queue an ended span (on the event loop's thread, which ends them all); never
        blocks: past ``OTEL_BSP_MAX_QUEUE_SIZE`` the span is dropped and counted."""
        self.record_whole(span)

    def record_whole(self, record: Span | Notified | Attempts) -> None:
        """Queue a record (:mod:`gateway.tracing.records`): its spans, kept or dropped
        together."""
        spans = record.count
        queued = self._queued_spans - self._taken_spans
        if queued + spans > self._max_queued:
            if not self._overflowed:
                log.warning("spans are made faster than the collector takes them; dropping")
            self._overflowed += spans
            return
        self._queue.append(record)
        self._queued_spans += spans
        if queued < self._batch <= queued + spans:  # one signal per batch, not per span
            self._wake.set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self._delay_s)
            self._wake.clear()
            self._sending(everything=False)
        self._sending(everything=True)
        self._poster.close()

    def _sending(self, *, everything: bool) -> None:
        """:meth:`_send`, which no failure ends the thread through: an exception out of one
        export loses that export's spans, logged, and the next export is tried as usual. (A
        thread that died here would drop every later span for the process's life, with
        nothing in the gateway's log to say why.)"""
        try:
            self._send(everything=everything)
        except Exception as exc:  # the thread must live on
            # The type alone: the message may name the collector's URL, credentials and all.
            log.error("span export failed (%s); its spans are dropped", type(exc).__name__)

    def _send(self, *, everything: bool) -> None:
        """Export what is queued in batches: all of it, or until less than a batch is left
        (the rest waits for the next wake-up, to make large batches)."""
        while True:
            if self._given_up:
                return  # a close counted what is left, and stopped waiting for this thread
            if time.monotonic() >= self._deadline:  # only once shutdown() has set it
                self._late += self._drop_queued()
                return
            encoded = self._take()
            if not encoded:
                return
            spans = len(encoded)
            try:
                taken = self._poster.post(self._encoder.request(encoded), spans, self._deadline)
            except Exception:
                if not self._given_up:
                    self._failed += spans  # logged by _sending
                raise
            if self._given_up:
                return  # counted by shutdown() already, with the rest
            # Those not taken: the post has said why (the collector's answer, or none).
            self.exported += taken
            self._not_taken += spans - taken
            waiting = len(self._pending) + self._queued_spans - self._taken_spans
            if not everything and waiting < self._batch:
                return

    def _drop_queued(self) -> int:
        """Empty the queue and what is left over of the last record taken; the spans they
        held."""
        dropped = len(self._pending)
        self._pending = []
        queue = self._queue
        while queue:
            count = queue.popleft().count
            self._taken_spans += count
            dropped += count
        return dropped

    def _take(self) -> list[bytes]:
        """Up to a batch of spans, encoded: those left over from the last record taken first.
        A span that cannot be encoded is dropped and counted alone."""
        queue, encoder, batch = self._queue, self._encoder, self._batch
        encoded, self._pending = self._pending, []
        while len(encoded) < batch and queue:
            item = queue.popleft()
            if isinstance(item, Span):
                self._taken_spans += 1
                try:
                    encoded.append(encoder.span(item))
                except Exception:  # an attribute of a type OTLP has no encoding for
                    log.exception("could not encode the span %r; dropped", item.name)
                    self._unencodable += 1
            else:
                count = item.count
                self._taken_spans += count
                try:
                    if type(item) is Notified:
                        encoded += encoder.notified(item)
                    else:
                        assert isinstance(item, Attempts)
                        encoded += encoder.attempts(item)
                except Exception:  # as for a span: dropped and counted, the rest goes on
                    log.exception("could not encode the spans of a record; dropped")
                    self._unencodable += count
        if len(encoded) > batch:  # a record's second span: the next batch's first
            encoded, self._pending = encoded[:batch], encoded[batch:]
        return encoded

    def shutdown(self) -> None:
        """Export everything still queued for up to ``OTEL_BSP_EXPORT_TIMEOUT``, then stop:
        what is not exported by then is dropped, counted and logged, never waited for longer
        (a collector that never answers would otherwise hold the thread, or the close, for
        as long as its timeout and retries allow, and lose what remains without a word)."""
        self._deadline = time.monotonic() + self._flush_s
        self._stopping.set()
        self._wake.set()
        self._thread.join(self._flush_s)
        if self._thread.is_alive():
            self._poster.abort()  # the post it is blocked in, past the time limit, ends now
            self._thread.join(_ABORT_WAIT_S)
        if self._thread.is_alive():
            # Blocked where no socket could be shut: what it holds, and what is still queued,
            # are counted here, and it counts nothing more.
            self._given_up = True
            self._abandoned = max(self._queued_spans - self._counted(), 0)
        if self.dropped:
            log.warning("%d spans were dropped: %s", self.dropped, self._why_dropped())

    def _why_dropped(self) -> str:
        """Why the spans counted in :attr:`dropped` were: one reason alone as it is, several
        each with its own count (a full queue asks for a larger queue or a faster collector,
        a refusing collector for a look at the collector)."""
        reasons = [
            (self._overflowed, "the export queue was full"),
            (self._not_taken, "the collector did not take them"),
            (self._unencodable, "they could not be encoded"),
            (self._failed, "their export failed"),
            (self._late + self._abandoned, "the flush ran out of time (OTEL_BSP_EXPORT_TIMEOUT)"),
        ]
        found = [(count, why) for count, why in reasons if count]
        if len(found) == 1:
            return found[0][1]
        return ", ".join(f"{count} as {why}" for count, why in found)


class Exporting:
    """The exporter for ``config``; :attr:`tracing` makes the spans."""

    def __init__(self, config: TracingConfig, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        resource = Resource.create(
            {"service.name": config.service_name, "service.version": __version__}
        )
        encoder = Encoder(resource.attributes, "waba-gateway", __version__)
        self.batches = Batches(encoder, collector_from(config.endpoint, env), env)
        self.tracing = Tracing(self.batches.record, config.sample_ratio, self.batches.record_whole)

    async def close(self) -> None:
        """Export what is still queued, then stop the exporter (off the event loop: it blocks
        on the collector)."""
        await asyncio.to_thread(self.batches.shutdown)
