"""The gateway's spans: what each one is named and carries, and how it is recorded.

Rule: nothing here knows the exporter, and nothing here is reached with tracing off: the request
path and the dispatcher hold a :class:`Tracing` only when ``[tracing] enabled = true``, so an
untraced gateway builds no span object. The listener and the dispatcher make plain records
(:mod:`gateway.tracing.records`: a notification's SERVER span and commit as one, a batch's
attempts as one) that the exporter's thread encodes; anything else gets an API span that
records itself (:mod:`gateway.tracing.apispan`), and a record given to a recorder of spans
alone becomes the API spans it stands for. Attributes are those of
:mod:`gateway.tracing.attributes`; no event is ever recorded (an event's text may hold anything).
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.trace import StatusCode

from gateway.tracing.apispan import CLIENT, INTERNAL, SERVER, Recorder, Span
from gateway.tracing.attributes import attempt_attributes, status_attributes, target_attributes
from gateway.tracing.context import (
    SAMPLED,
    parse_stored,
    parse_traceparent,
)
from gateway.tracing.records import DUPLICATE, Attempt, Attempts, Ended, Link, Notified

__all__ = ["CLIENT", "INTERNAL", "SERVER", "Recorder", "Span", "Tracing"]

_UNTRUSTED: Final[Mapping[str, Any]] = {"gateway.link": "untrusted"}
_NO_ATTRIBUTES: Final[Mapping[str, Any]] = {}

# Ids from the random module (as the SDK's), reseeded in each forked worker by the module itself.
_random_bits = random.getrandbits  # the bits as an int: no frame of random.randbytes
_NO_PARENT: Final = b""
_LOW_64: Final = (1 << 64) - 1


_STORED_KEPT: Final = 1024  # the trace contexts whose parents are kept (a fraction of a second)


# An attempt's (trace id, sampled, parent span id, tracestate), as _attempt_parent gives it: kept
# in this form for the contexts stored lately, so that an attempt takes it as it is.
_Found = tuple[bytes, bool, bytes, str]

# Given each record with a sampled span as its work ends (gateway.tracing.records).
RecordRecorder = Callable[[Notified | Attempts], None]


@functools.lru_cache(maxsize=64)  # the same few statuses, request after request
def _status(status: int | None) -> Mapping[str, Any]:
    """A response's attributes (:func:`status_attributes`), shared and read-only: the
    encoder encodes each such mapping once."""
    return MappingProxyType(status_attributes(status, None))


@functools.lru_cache(maxsize=64)
def _committed(deliveries: int | None) -> Mapping[str, Any]:
    """A commit's attributes, shared and read-only."""
    return MappingProxyType(
        {"gateway.duplicate": deliveries is None, "gateway.deliveries": deliveries or 0}
    )


def _linked(foreign: str) -> tuple[Link, ...]:
    """The link to a ``traceparent`` someone sent, never a parent (none if it is not one)."""
    linked = parse_traceparent(foreign)
    if linked is None:
        return ()
    return ((linked.trace_id, linked.span_id, linked.flags, _UNTRUSTED),)


class Tracing:
    """Makes the gateway's spans, sampling new traces at ``sample_ratio`` (as OpenTelemetry's
    ``ParentBased(TraceIdRatioBased)``: a child follows its parent's decision), and gives
    each sampled span to ``recorder`` when it ends."""

    def __init__(
        self,
        recorder: Recorder,
        sample_ratio: float = 1.0,
        records: RecordRecorder | None = None,
    ) -> None:
        """``records``: given the plain records whole (the exporter encodes them); without it
        each record is given to ``recorder`` as the API spans it stands for."""
        self._recorder = recorder
        self._records = records or self.as_spans
        # TraceIdRatioBased's rule: the low 64 bits of the trace id under ratio * 2**64.
        self._bound = round(sample_ratio * (1 << 64))
        self._all = self._bound >= 1 << 64
        # The parents of the trace contexts stored lately, by their text: a first attempt,
        # made in this process moments after the commit, finds its parent here instead of
        # parsing the text again (the larger part of an attempt span's cost). After a restart,
        # or once cleared, the text is parsed.
        self._stored: dict[str, _Found] = {}

    def _root(self) -> tuple[bytes, bool]:
        bits = _random_bits(128) or 1  # all zeros: invalid
        # TraceIdRatioBased reads the low 64 bits of the trace id.
        return bits.to_bytes(16), self._all or bits & _LOW_64 < self._bound

    def server_span(self, path: str, attributes: Mapping[str, Any], foreign: str | None) -> Span:
        """The SERVER span of one ``POST path`` at the callback, with ``attributes`` (see
        :func:`~gateway.tracing.attributes.server_attributes`). Always a root: Meta sends no
        traceparent, and anyone else's (``foreign``) is only recorded as a link."""
        links = () if foreign is None else _linked(foreign)
        trace_id, sampled = self._root()
        return Span(
            self._recorder,
            f"POST {path}",
            SERVER,
            trace_id,
            _NO_PARENT,
            "",
            sampled,
            attributes,
            time.time_ns(),
            links,
        )

    def notified(self, path: str, attributes: Mapping[str, Any], foreign: str | None) -> Notified:
        """The listener's record of one ``POST path``: what :meth:`server_span` and
        :meth:`commit_span` make, as plain values (see :mod:`gateway.tracing.records`)."""
        links = () if foreign is None else _linked(foreign)
        bits = _random_bits(256)  # the trace id and both span ids from one call
        trace_id = bits >> 128 or 1  # all zeros: invalid
        sampled = self._all or trace_id & _LOW_64 < self._bound
        return Notified(
            path,
            attributes,
            trace_id,
            bits >> 64 & _LOW_64 or 1,
            bits & _LOW_64 or 1,
            sampled,
            links,
        )

    def stored_notified(self, record: Notified) -> str:
        """:meth:`stored` for a :class:`Notified`: its SERVER span's trace context."""
        sampled = record.sampled
        trace_id, span_id = record.trace_id.to_bytes(16), record.server_id.to_bytes(8)
        # bytes.hex: a quarter of the time of formatting the ints with "032x".
        context = f"00-{trace_id.hex()}-{span_id.hex()}-{'01' if sampled else '00'}"
        known = self._stored
        if len(known) >= _STORED_KEPT:
            known.clear()
        known[context] = (trace_id, sampled, span_id, "")
        return context

    def end_notified(
        self, record: Notified, status: int, failure: BaseException | None = None
    ) -> None:
        """The request was answered with ``status``; ``failure``: what failed it, which is the
        commit's error if the commit was under way (its type only: its text may name
        anything)."""
        if record.end_ns:
            return  # answered once; recorded once
        record.end_ns = time.time_ns()
        record.status = status
        if record.commit_start_ns and not record.commit_end_ns:
            record.commit_end_ns = record.end_ns
            record.error = "_OTHER" if failure is None else type(failure).__qualname__
        if record.sampled:
            self._records(record)

    def as_spans(self, record: Notified | Attempts) -> None:
        """Give ``record`` (one ended) to the recorder as the API spans it stands for: a
        notification's commit, then its SERVER span, as :meth:`commit_span` and
        :meth:`server_span` make and end them; each sampled attempt as a CLIENT span, a child
        of its stored context, ended with what came back and what it led to."""
        if isinstance(record, Attempts):
            for span, ended in zip(record.spans, record.ended, strict=True):
                trace_id, span_id, parent_id, state, sampled, delivery_id, attempt = span
                made = Span(
                    self._recorder,
                    record.name,
                    CLIENT,
                    trace_id,
                    parent_id,
                    state,
                    sampled,
                    record.shared,
                    record.start_ns,
                )
                made.span_id = span_id
                made.changed = attempt_attributes(delivery_id, attempt)
                self._end_attempt(made, *ended, record.end_ns)
            return
        trace_id, server_id = record.trace_id.to_bytes(16), record.server_id.to_bytes(8)
        args = (self._recorder, f"POST {record.path}", SERVER, trace_id, _NO_PARENT, "", True)
        server = Span(*args, record.attributes, record.start_ns, record.links)
        server.span_id = server_id
        if record.commit_start_ns:
            commit = Span(
                self._recorder,
                "outbox commit",
                INTERNAL,
                trace_id,
                server_id,
                "",
                True,
                _NO_ATTRIBUTES,
                record.commit_start_ns,
                remote_parent=False,
            )
            commit.span_id = record.commit_id.to_bytes(8)
            if record.error is None:
                deliveries = record.deliveries
                commit.changed = _committed(None if deliveries == DUPLICATE else deliveries)
            else:
                commit.changed = {"error.type": record.error}
                commit.error = True
            commit.end(record.commit_end_ns)
        server.changed = _status(record.status)
        server.error = record.status >= 500
        server.end(record.end_ns)

    @staticmethod
    def end_server(span: trace.Span, status: int) -> None:
        """End a SERVER span with the status the callback answered."""
        if isinstance(span, Span) and span.changed is None:
            span.changed = _status(status)  # shared: the span ends here
        else:
            span.set_attributes(_status(status))
        if status >= 500:  # 4xx is the client's error, not the server's (semantic conventions)
            span.set_status(StatusCode.ERROR)
        span.end()

    def commit_span(self, server: Span) -> Span:
        """The outbox commit of a notification, a child of its SERVER span."""
        return Span(
            self._recorder,
            "outbox commit",
            INTERNAL,
            server.trace_id,
            server.span_id,
            server.trace_state,
            server.sampled,
            _NO_ATTRIBUTES,
            time.time_ns(),
            remote_parent=False,
        )

    @staticmethod
    def committed(commit: trace.Span, deliveries: int | None) -> None:
        """A commit's result: how many deliveries it stored (``None``: a duplicate, none)."""
        found = _committed(deliveries)
        if isinstance(commit, Span) and commit.changed is None:
            commit.changed = found  # shared: never changed in place (Span.set_attributes)
        else:
            commit.set_attributes(found)

    @staticmethod
    def failed(span: trace.Span, exc: BaseException) -> None:
        """A span whose work raised: the error's type only (its text may name anything)."""
        span.record_exception(exc)
        span.set_status(StatusCode.ERROR)

    def stored(self, server: Span) -> str | None:
        """The trace context kept with a notification's deliveries: its SERVER span's."""
        context = server.traceparent()
        known = self._stored
        if len(known) >= _STORED_KEPT:
            known.clear()
        known[context] = (server.trace_id, server.sampled, server.span_id, server.trace_state)
        return context

    def _attempt_parent(self, trace_context: str | None) -> tuple[bytes, bool, bytes, str]:
        """An attempt's trace id, whether it is sampled, its parent span id and tracestate:
        from its stored trace context (one of the last kept here, else parsed), or a new root
        where none was stored or it cannot be read."""
        found = self._stored.get(trace_context) if trace_context else None
        if found is not None:
            return found
        parent = parse_stored(trace_context)
        if parent is None:
            trace_id, sampled = self._root()
            return trace_id, sampled, _NO_PARENT, ""
        return parent.trace_id, bool(parent.flags & SAMPLED), parent.span_id, parent.trace_state

    @staticmethod
    def _end_attempt(
        span: trace.Span, status: int | None, error: str | None, outcome: str, end_ns: int = 0
    ) -> None:
        answered = status_attributes(None, error) if status is None else _status(status)
        span.set_attributes({**answered, "gateway.delivery.outcome": outcome})
        if outcome != "delivered":
            span.set_status(StatusCode.ERROR)
        span.end(end_ns or None)

    def attempts(
        self,
        url: str,
        target: str,
        deliveries: Sequence[tuple[str, str | None, int]],
        kind: str = "http",
    ) -> Attempts:
        """One CLIENT span per attempt ``(delivery id, stored trace context, attempt number)``,
        as one plain record (:class:`Attempts`) with no span object: each a child of its
        stored context (a root where none was stored), with the headers that carry it to the
        target. Named ``POST`` for an HTTP target (the HTTP conventions), ``send <target>`` for
        a broker (the messaging ones). :meth:`end_attempts` ends it."""
        name = "POST" if kind == "http" else f"send {target}"
        spans: list[Attempt] = []
        headers: list[dict[str, str]] = []
        sampled_count = 0
        known = self._stored
        for delivery_id, trace_context, attempt in deliveries:
            found = known.get(trace_context) if trace_context else None  # _attempt_parent's
            trace_id, sampled, parent_id, trace_state = found or self._attempt_parent(trace_context)
            span_id = (_random_bits(64) or 1).to_bytes(8)
            spans.append((trace_id, span_id, parent_id, trace_state, sampled, delivery_id, attempt))
            flags = "01" if sampled else "00"  # format_traceparent, without its call
            carried = {"traceparent": f"00-{trace_id.hex()}-{span_id.hex()}-{flags}"}
            if trace_state:
                carried["tracestate"] = trace_state
            headers.append(carried)
            sampled_count += sampled
        return Attempts(name, target_attributes(url, target, kind), spans, headers, sampled_count)

    def end_attempts(self, attempts: Attempts, ended: Sequence[Ended]) -> None:
        """End a batch's spans, each with what came back and what it led to (``ended``, in
        the batch's order)."""
        if attempts.end_ns:
            return  # ended once; recorded once
        attempts.end_ns = time.time_ns()
        attempts.ended = ended
        if attempts.count:
            self._records(attempts)
