"""Spans in OTLP's protobuf encoding (opentelemetry/proto/trace/v1/trace.proto and
collector/trace/v1/trace_service.proto), written directly as bytes.

Rule: pure; spans in, one ``ExportTraceServiceRequest`` out. What is the same for every span is
encoded once: the resource and instrumentation scope (:func:`request_prefix`), each span name,
and each attribute that recurs (a method, a route, a certificate's CN, a target's name) from a
bounded cache; per span only its ids, times, status and the attributes that vary are encoded.
Building the protobuf objects of the generated classes cost more CPU than the request the spans
traced (bench/README.md, "Tracing, lean spans"); the tests decode what this writes with those
generated classes (opentelemetry-proto).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from gateway.tracing.context import SAMPLED
from gateway.tracing.spans import Span

__all__ = ["Encoder", "key_values", "request_prefix"]

_FIXED32: Final = struct.Struct("<I").pack
_DOUBLE: Final = struct.Struct("<d").pack
_INT64: Final = (1 << 64) - 1
# OTLP's span flags: bits 8 and 9 say whether the parent is known to be remote, and is.
_HAS_IS_REMOTE: Final = 0x100
_IS_REMOTE: Final = 0x200
# Status { code = 3: STATUS_CODE_ERROR (2) }, as Span field 15.
_ERROR_STATUS: Final = b"\x7a\x02\x18\x02"
_CACHE_LIMIT: Final = 4096
# Trace id (field 1) and span id (2), each with its tag and length.
_IDS: Final = struct.Struct("<2s16s2s8s").pack
# Kind (6, a varint below 128), start (7) and end (8) times, each with its tag.
_TIMES: Final = struct.Struct("<BBBQBQ").pack
# Span flags (16, fixed32) with its two-byte tag: a root's by sampled, a child's by
# (remote parent, sampled).
_ROOT_FLAGS: Final = {s: b"\x85\x01" + _FIXED32(SAMPLED if s else 0) for s in (False, True)}
_CHILD_FLAGS: Final = {
    (r, s): b"\x85\x01"
    + _FIXED32(_HAS_IS_REMOTE | (_IS_REMOTE if r else 0) | (SAMPLED if s else 0))
    for r in (False, True)
    for s in (False, True)
}
_SHARED_LIMIT: Final = 1024  # connections' and targets' attribute sets
# Attributes whose values never recur: not worth a place in the cache.
_UNCACHED: Final = frozenset({"gateway.delivery.id"})


def _varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    if value < 0x4000:  # a span's length, most often
        return bytes(((value & 0x7F) | 0x80, value >> 7))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag byte(s), length and payload."""
    return tag + _varint(len(payload)) + payload


def _any_value(value: Any) -> bytes:
    """AnyValue: string 1, bool 2, int 3, double 4, array 5 (ArrayValue { values 1 })."""
    if isinstance(value, str):
        return _field(b"\x0a", value.encode())
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value & _INT64)
    if isinstance(value, float):
        return b"\x21" + _DOUBLE(value)
    if isinstance(value, bytes):
        return _field(b"\x3a", value)
    if isinstance(value, Sequence):
        return _field(b"\x2a", b"".join(_field(b"\x0a", _any_value(v)) for v in value))
    return _field(b"\x0a", str(value).encode())


def _key_value(key: str, value: Any) -> bytes:
    """A KeyValue { key 1, value 2 } with its length, ready to follow any field's tag."""
    body = _field(b"\x0a", key.encode()) + _field(b"\x12", _any_value(value))
    return _varint(len(body)) + body


def key_values(tag: bytes, attributes: Mapping[str, Any]) -> bytes:
    """``attributes`` as repeated KeyValue fields with ``tag`` (uncached: for the constant
    parts, encoded once)."""
    return b"".join(tag + _key_value(key, value) for key, value in attributes.items())


def request_prefix(resource: Mapping[str, Any], scope: str, version: str) -> tuple[bytes, bytes]:
    """The encoded Resource (ResourceSpans field 1) and InstrumentationScope (ScopeSpans
    field 1) of every request: the same for the life of the process."""
    encoded_resource = _field(b"\x0a", key_values(b"\x0a", resource))
    names = _field(b"\x0a", scope.encode()) + _field(b"\x12", version.encode())
    encoded_scope = _field(b"\x0a", names)
    return encoded_resource, encoded_scope


class Encoder:
    """Encodes batches of spans for one resource and scope, caching what recurs."""

    def __init__(self, resource: Mapping[str, Any], scope: str, version: str) -> None:
        self._resource, self._scope = request_prefix(resource, scope, version)
        self._attributes: dict[tuple[str, type, Any], bytes] = {}
        self._names: dict[str, bytes] = {}
        # Each shared attribute mapping encoded once (kept with it, so its id is not reused).
        self._shared: dict[int, tuple[Mapping[str, Any], bytes]] = {}

    def _shared_attributes(self, attributes: Mapping[str, Any]) -> bytes:
        found = self._shared.get(id(attributes))
        if found is not None and found[0] is attributes:
            return found[1]
        if len(self._shared) >= _SHARED_LIMIT:
            self._shared.clear()
        encoded = b"".join(b"\x4a" + self._attribute(k, v) for k, v in attributes.items())
        self._shared[id(attributes)] = (attributes, encoded)
        return encoded

    def _attribute(self, key: str, value: Any) -> bytes:
        if key in _UNCACHED:
            return _key_value(key, value)
        cache_key = (key, type(value), value)
        try:
            return self._attributes[cache_key]
        except KeyError:
            pass
        except TypeError:  # not hashable (a list): encoded every time
            return _key_value(key, value)
        if len(self._attributes) >= _CACHE_LIMIT:
            self._attributes.clear()  # delivery ids and ports never recur: start afresh
        encoded = self._attributes[cache_key] = _key_value(key, value)
        return encoded

    def span(self, span: Span) -> bytes:
        """One span, as the ScopeSpans field (2) that holds it (one thread at a time: the
        caches are not locked)."""
        name = self._names.get(span.name)
        if name is None:
            if len(self._names) >= _CACHE_LIMIT:
                self._names.clear()
            name = self._names[span.name] = _field(b"\x2a", span.name.encode())
        if span.parent_id:
            parent = b"\x22\x08" + span.parent_id
            flags = _CHILD_FLAGS[span.remote_parent, span.sampled]
        else:
            parent = b""
            flags = _ROOT_FLAGS[span.sampled]
        parts = [
            _IDS(b"\x0a\x10", span.trace_id, b"\x12\x08", span.span_id),
            _field(b"\x1a", span.trace_state.encode()) if span.trace_state else b"",
            parent,
            name,
            _TIMES(0x30, span.kind, 0x39, span.start_ns, 0x41, span.end_ns),
        ]
        changed = span.changed
        if changed is None or changed.keys().isdisjoint(span.attributes):
            parts.append(self._shared_attributes(span.attributes))
        else:  # a shared attribute set again: the span's own value wins
            attribute = self._attribute
            for key, value in span.attributes.items():
                if key not in changed:
                    parts += (b"\x4a", attribute(key, value))
        if changed is not None:
            attribute = self._attribute
            for key, value in changed.items():
                parts += (b"\x4a", attribute(key, value))
        for trace_id, span_id, link_flags, link_attributes in span.links:
            link = (
                _IDS(b"\x0a\x10", trace_id, b"\x12\x08", span_id)
                + key_values(b"\x22", link_attributes)
                + b"\x35"
                + _FIXED32(link_flags | _HAS_IS_REMOTE | _IS_REMOTE)
            )
            parts.append(_field(b"\x6a", link))
        if span.error:
            parts.append(_ERROR_STATUS)
        parts.append(flags)
        body = b"".join(parts)
        return _field(b"\x12", body)

    def encode(self, spans: Iterable[Span]) -> bytes:
        """One ExportTraceServiceRequest holding ``spans``."""
        return self.request([self.span(span) for span in spans])

    def request(self, encoded: Iterable[bytes]) -> bytes:
        """One ExportTraceServiceRequest holding spans already encoded by :meth:`span` (safe
        on another thread than the one encoding spans: it reads constants only)."""
        scope_spans = self._scope + b"".join(encoded)
        resource_spans = self._resource + _field(b"\x12", scope_spans)
        return _field(b"\x0a", resource_spans)
