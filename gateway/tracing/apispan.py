"""The gateway's API span: an OpenTelemetry :class:`opentelemetry.trace.Span` that records itself.

Rule: nothing here knows the exporter. Its ids, times, status and the few attributes that vary
are plain values, handed at its end to the one callable that batches them for export
(:mod:`gateway.tracing.export`). No lock, no per-attribute validation, no context objects: the
SDK's general-purpose span cost several times the CPU of the request it traced (bench/README.md,
"Tracing, lean spans"). No event is ever recorded (an event's text may hold anything). The
event loop's hot paths make plain records instead (:mod:`gateway.tracing.records`); this span
is what the embedded app and callers of the API get.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.trace import SpanContext, Status, StatusCode, TraceFlags, TraceState
from opentelemetry.util import types

from gateway.tracing.context import SAMPLED, Parent, format_traceparent
from gateway.tracing.records import Link

__all__ = ["CLIENT", "INTERNAL", "SERVER", "Recorder", "Span"]

# Span.kind as OTLP numbers it.
INTERNAL: Final = 1
SERVER: Final = 2
CLIENT: Final = 3

# Ids from the random module (as the SDK's), reseeded in each forked worker by the module itself.
_random_bits = random.getrandbits  # the bits as an int: no frame of random.randbytes


class Span(trace.Span):
    """One span, recorded by ``recorder`` when it ends if it is sampled.

    ``attributes``: set at its start and shared between spans (a connection's, a target's), so
    never changed once given (the exporter encodes each such mapping once); ``changed``: the
    span's own, set after, which win over the shared ones of the same key."""

    __slots__ = (
        "attributes",
        "changed",
        "end_ns",
        "error",
        "kind",
        "links",
        "name",
        "parent_id",
        "recorder",
        "remote_parent",
        "sampled",
        "span_id",
        "start_ns",
        "trace_id",
        "trace_state",
    )
    count: Final = 1  # the spans it stands for, as a record's count (gateway.tracing.export)

    def __init__(
        self,
        recorder: Recorder,
        name: str,
        kind: int,
        trace_id: bytes,
        parent_id: bytes,
        trace_state: str,
        sampled: bool,
        attributes: Mapping[str, Any],
        start_ns: int,
        links: Sequence[Link] = (),
        remote_parent: bool = True,
    ) -> None:
        self.recorder = recorder
        self.name = name
        self.kind = kind
        self.trace_id = trace_id
        self.span_id = (_random_bits(64) or 1).to_bytes(8)  # all zeros: invalid
        self.parent_id = parent_id  # b"": a root
        self.trace_state = trace_state
        self.remote_parent = remote_parent
        self.sampled = sampled
        self.attributes = attributes
        self.changed: Mapping[str, Any] | None = None
        self.start_ns = start_ns
        self.end_ns = 0
        self.links = links
        self.error = False

    def as_parent(self) -> Parent:
        """This span as the parent of another made here."""
        flags = SAMPLED if self.sampled else 0
        return Parent(self.trace_id, self.span_id, flags, self.trace_state)

    def traceparent(self) -> str:
        """The ``traceparent`` header that makes a receiver's spans children of this one."""
        return format_traceparent(self.trace_id, self.span_id, self.sampled)

    # -- opentelemetry.trace.Span ------------------------------------------------------------

    def end(self, end_time: int | None = None) -> None:
        if self.end_ns:
            return  # ended once; a span is recorded once
        self.end_ns = end_time or time.time_ns()
        if self.sampled:
            self.recorder(self)

    def get_span_context(self) -> SpanContext:
        state = TraceState.from_header([self.trace_state]) if self.trace_state else None
        flags = TraceFlags(SAMPLED if self.sampled else 0)
        trace_id, span_id = int.from_bytes(self.trace_id), int.from_bytes(self.span_id)
        return SpanContext(trace_id, span_id, False, flags, state)

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        # A new mapping each time, never one changed in place: ``changed`` may be one of the
        # read-only mappings Tracing shares between spans (a status, a commit's result).
        if not self.end_ns:
            self.changed = (
                dict(attributes) if self.changed is None else {**self.changed, **attributes}
            )

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        self.set_attributes({key: value})

    def add_event(
        self, name: str, attributes: types.Attributes = None, timestamp: int | None = None
    ) -> None:
        """Not recorded: the gateway's spans have no events (an event's text may hold
        personal data)."""

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        if not self.end_ns and context.is_valid:
            link = (
                context.trace_id.to_bytes(16),
                context.span_id.to_bytes(8),
                context.trace_flags,
                attributes or {},
            )
            self.links = (*self.links, link)

    def update_name(self, name: str) -> None:
        if not self.end_ns:
            self.name = name

    def is_recording(self) -> bool:
        return self.sampled and not self.end_ns

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        code = status.status_code if isinstance(status, Status) else status
        if not self.end_ns and code is not StatusCode.UNSET:
            self.error = code is StatusCode.ERROR

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        """The exception's type only, as ``error.type``: its text may name anything."""
        self.set_attribute("error.type", type(exception).__qualname__)


# Given each sampled span as it ends.
Recorder = Callable[[Span], None]
