"""Spans in OTLP's protobuf encoding (opentelemetry/proto/trace/v1/trace.proto and
collector/trace/v1/trace_service.proto), written directly as bytes.

Rule: pure; spans in (API spans, and the plain records of :mod:`gateway.tracing.records`, each
written byte for byte as the API spans it stands for), one ``ExportTraceServiceRequest`` out.
What is the same for every span is encoded once: the resource and instrumentation scope
(:func:`request_prefix`), each span name, and each attribute that recurs (a method, a route, a
certificate's CN, a target's name) from a bounded cache; per span only its ids, times, status
and the attributes that vary are encoded. Building the protobuf objects of the generated classes
cost more CPU than the request the spans traced (bench/README.md, "Tracing, lean spans"); the
tests decode what this writes with those generated classes (opentelemetry-proto).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final

from gateway.tracing.attributes import ServerAttributes, status_attributes
from gateway.tracing.context import SAMPLED
from gateway.tracing.records import DUPLICATE, Attempts, Notified
from gateway.tracing.spans import CLIENT, INTERNAL, SERVER, Span

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
# Attributes whose values never recur (a delivery's id, a connection's port): not worth a
# place in the cache, where they would only push out those that do.
_UNCACHED: Final = frozenset({"gateway.delivery.id", "client.port", "network.peer.port"})
_DELIVERY_ID_KEY: Final = b"\x0a\x13gateway.delivery.id"
# A child's three ids (trace 1, span 2, parent 4), each with its tag and length.
_CHILD_IDS: Final = struct.Struct("<2s16s2s8s2s8s").pack
# The commit span's fixed part: its ids, parent, name (field 5), kind and times.
_COMMIT_NAME: Final = b"\x2a\x0doutbox commit"
_COMMIT_HEAD_STRUCT: Final = struct.Struct("<2s16s2s8s2s8s15sBBBQBQ")
_COMMIT_HEAD: Final = _COMMIT_HEAD_STRUCT.pack
_COMMIT_HEAD_SIZE: Final = _COMMIT_HEAD_STRUCT.size


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# The varints of lengths up to a long span's, looked up rather than computed: the hot loops
# index this table inline (a function call costs more than the encoding itself).
_SMALL_LIMIT: Final = 2048
_SMALL: Final = tuple(_encode_varint(value) for value in range(_SMALL_LIMIT))


def _varint(value: int) -> bytes:
    return _SMALL[value] if value < _SMALL_LIMIT else _encode_varint(value)


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
        # A SERVER span's name by its path, and its response's attributes by status.
        self._statuses: dict[int, bytes] = {}
        self._results: dict[int, bytes] = {}  # a commit's attributes, by deliveries stored
        self._tails: dict[tuple[int, int, str], bytes] = {}  # see _tail
        self._commits: dict[tuple[int, bool], tuple[bytes, bytes]] = {}  # see _commit_tail
        self._server_heads: dict[str, tuple[Callable[..., bytes], bytes]] = {}
        self._server_tails: dict[tuple[int, bool], bytes] = {}  # see _server_tail
        self._owns: dict[int, bytes] = {}  # see _own

    def _shared_attributes(self, attributes: Mapping[str, Any]) -> bytes:
        found = self._shared.get(id(attributes))
        if found is not None and found[0] is attributes:
            return found[1]
        if len(self._shared) >= _SHARED_LIMIT:
            self._shared.clear()
        if type(attributes) is ServerAttributes:
            # A new connection: what its path and certificate give is encoded once for all.
            own = attributes.own.items()
            encoded = b"".join(
                [self._shared_attributes(attributes.constant)]
                + [self._attribute(k, v) for k, v in own]
            )
        else:
            encoded = b"".join([self._attribute(k, v) for k, v in attributes.items()])
        self._shared[id(attributes)] = (attributes, encoded)
        return encoded

    def _attribute(self, key: str, value: Any) -> bytes:
        """One attribute as a Span's field 9 (tag, length, KeyValue)."""
        if key in _UNCACHED:
            return b"\x4a" + _key_value(key, value)
        cache_key = (key, type(value), value)
        try:
            return self._attributes[cache_key]
        except KeyError:
            pass
        except TypeError:  # not hashable (a list): encoded every time
            return b"\x4a" + _key_value(key, value)
        if len(self._attributes) >= _CACHE_LIMIT:
            self._attributes.clear()  # ports and counts rarely recur: start afresh
        encoded = self._attributes[cache_key] = b"\x4a" + _key_value(key, value)
        return encoded

    def _name(self, name: str) -> bytes:
        if len(self._names) >= _CACHE_LIMIT:
            self._names.clear()
        encoded = self._names[name] = _field(b"\x2a", name.encode())
        return encoded

    def span(self, span: Span) -> bytes:
        """One span, as the ScopeSpans field (2) that holds it (one thread at a time: the
        caches are not locked). The parts of fixed size are packed, the rest comes from the
        caches: per span, only the ids, times and the attributes that never recur are
        encoded afresh."""
        name = self._names.get(span.name) or self._name(span.name)
        shared, changed = span.attributes, span.changed
        if changed is None:
            attributes = self._shared_attributes(shared)
        elif type(changed) is MappingProxyType:  # read-only, shared: encoded once
            if changed.keys().isdisjoint(shared):
                attributes = self._shared_attributes(shared) + self._shared_attributes(changed)
            else:
                attributes = self._overridden(shared, changed)
        elif changed.keys().isdisjoint(shared):
            attribute = self._attribute
            own = [self._shared_attributes(shared)]
            for key, value in changed.items():
                own.append(attribute(key, value))
            attributes = b"".join(own)
        else:
            attributes = self._overridden(shared, changed)
        parent_id = span.parent_id
        body = b"".join(
            (
                _IDS(b"\x0a\x10", span.trace_id, b"\x12\x08", span.span_id),
                _field(b"\x1a", span.trace_state.encode()) if span.trace_state else b"",
                b"\x22\x08" + parent_id if parent_id else b"",
                name,
                _TIMES(0x30, span.kind, 0x39, span.start_ns, 0x41, span.end_ns),
                attributes,
                self._links(span.links) if span.links else b"",
                _ERROR_STATUS if span.error else b"",
                _CHILD_FLAGS[span.remote_parent, span.sampled]
                if parent_id
                else _ROOT_FLAGS[span.sampled],
            )
        )
        return b"\x12" + _varint(len(body)) + body

    def notified(self, record: Notified) -> list[bytes]:
        """The spans a :class:`~gateway.tracing.records.Notified` stands for, each as
        :meth:`span` encodes it: the commit's (if the outbox was reached), then the SERVER
        span, byte for byte what :meth:`span` makes of the API spans (a test compares). Each
        span is one join of a packed head (ids, name, kind, times), the cached attributes and
        a cached tail (what its result or status gives, with its length's prefix where the
        length is known from the tail alone)."""
        trace_id = record.trace_id.to_bytes(16)
        server_id = record.server_id.to_bytes(8)
        sampled, status = record.sampled, record.status
        encoded = []
        if record.commit_start_ns:
            error = record.error
            found = self._commits.get((record.deliveries, sampled)) if error is None else None
            prefix, tail = found or self._commit_tail(record.deliveries, error, sampled)
            head = _COMMIT_HEAD(
                b"\x0a\x10",
                trace_id,
                b"\x12\x08",
                record.commit_id.to_bytes(8),
                b"\x22\x08",
                server_id,
                _COMMIT_NAME,
                0x30,
                INTERNAL,
                0x39,
                record.commit_start_ns,
                0x41,
                record.commit_end_ns,
            )
            encoded.append(b"".join((prefix, head, tail)))
        pack, name = self._server_heads.get(record.path) or self._server_head(record.path)
        attributes = record.attributes
        found_shared = self._shared.get(id(attributes))
        if found_shared is not None and found_shared[0] is attributes:
            shared = found_shared[1]
        else:
            shared = self._shared_attributes(attributes)
        if record.links:
            answered = self._statuses.get(status) or self._status(status)
            tail = b"".join(
                (
                    answered,
                    self._links(record.links),
                    _ERROR_STATUS if status >= 500 else b"",
                    _ROOT_FLAGS[sampled],
                )
            )
        else:
            tail = self._server_tails.get((status, sampled)) or self._server_tail(status, sampled)
        head = pack(
            b"\x0a\x10", trace_id, b"\x12\x08", server_id, name, 0x30, SERVER, 0x39,
            record.start_ns, 0x41, record.end_ns,
        )  # fmt: skip
        size = len(head) + len(shared) + len(tail)
        prefix = b"\x12" + (_SMALL[size] if size < _SMALL_LIMIT else _varint(size))
        encoded.append(b"".join((prefix, head, shared, tail)))
        return encoded

    def _commit_tail(
        self, deliveries: int, error: str | None, sampled: bool
    ) -> tuple[bytes, bytes]:
        """A commit span's length prefix and its tail (its result's attributes, an error's
        status, its flags); cached by result and sampling when it did not fail."""
        if error is None:
            result = self._results.get(deliveries) or self._result(deliveries)
        else:
            result = self._attribute("error.type", error) + _ERROR_STATUS
        tail = result + _CHILD_FLAGS[False, sampled]
        found = (b"\x12" + _varint(_COMMIT_HEAD_SIZE + len(tail)), tail)
        if error is None and len(self._commits) < _CACHE_LIMIT:
            self._commits[deliveries, sampled] = found
        return found

    def _server_head(self, path: str) -> tuple[Callable[..., bytes], bytes]:
        """The packer of a SERVER span's ids, name, kind and times, and its name (``POST
        path``) as the name field."""
        name = _field(b"\x2a", f"POST {path}".encode())
        if len(self._server_heads) >= _CACHE_LIMIT:
            self._server_heads.clear()
        found = struct.Struct(f"<2s16s2s8s{len(name)}sBBBQBQ").pack, name
        self._server_heads[path] = found
        return found

    def _server_tail(self, status: int, sampled: bool) -> bytes:
        """A SERVER span's response attributes, error status (from 500 on) and flags."""
        answered = self._statuses.get(status) or self._status(status)
        tail = answered + (_ERROR_STATUS if status >= 500 else b"") + _ROOT_FLAGS[sampled]
        if len(self._server_tails) < _CACHE_LIMIT:
            self._server_tails[status, sampled] = tail
        return tail

    def attempts(self, record: Attempts) -> list[bytes]:
        """The sampled CLIENT spans of a batch's record, each byte for byte what :meth:`span`
        makes of the API span :meth:`~gateway.tracing.spans.Tracing.as_spans` makes of it (a
        test compares). What the batch's spans share
        (name, kind, times, the target's attributes) is joined once; per span, its ids are
        packed and its delivery id follows a prefix cached by the id's length."""
        name = self._names.get(record.name) or self._name(record.name)
        middle = name + _TIMES(0x30, CLIENT, 0x39, record.start_ns, 0x41, record.end_ns)
        middle += self._shared_attributes(record.shared)
        tails = self._tails
        owns = self._owns
        encoded = []
        for span, (status, error, outcome) in zip(record.spans, record.ended, strict=True):
            trace_id, span_id, parent_id, state, sampled, delivery_id, attempt = span
            if not sampled:
                continue
            text = delivery_id.encode()
            own = owns.get(len(text)) or self._own(len(text))
            if status is None:
                tail = self._tail(attempt, None, error, outcome)
            else:
                tail = tails.get((attempt, status, outcome)) or self._tail(
                    attempt, status, None, outcome
                )
            if parent_id and not state:  # a child with no tracestate: the usual attempt
                head = _CHILD_IDS(
                    b"\x0a\x10", trace_id, b"\x12\x08", span_id, b"\x22\x08", parent_id
                )
                flags = _CHILD_FLAGS[True, True]
            else:
                head = b"".join(
                    (
                        _IDS(b"\x0a\x10", trace_id, b"\x12\x08", span_id),
                        _field(b"\x1a", state.encode()) if state else b"",
                        b"\x22\x08" + parent_id if parent_id else b"",
                    )
                )
                flags = _CHILD_FLAGS[True, True] if parent_id else _ROOT_FLAGS[True]
            size = len(head) + len(middle) + len(own) + len(text) + len(tail) + len(flags)
            prefix = b"\x12" + (_SMALL[size] if size < _SMALL_LIMIT else _encode_varint(size))
            encoded.append(b"".join((prefix, head, middle, own, text, tail, flags)))
        return encoded

    def _own(self, size: int) -> bytes:
        """What precedes a delivery id of ``size`` bytes in its attribute (Span field 9: the
        KeyValue's length, its key, the AnyValue's length and its string's tag and length)."""
        value_size = size + 1 + len(_varint(size))
        key_value_size = len(_DELIVERY_ID_KEY) + 1 + len(_varint(value_size)) + value_size
        own = b"".join(
            (
                b"\x4a",
                _varint(key_value_size),
                _DELIVERY_ID_KEY,
                b"\x12",
                _varint(value_size),
                b"\x0a",
                _varint(size),
            )
        )
        if len(self._owns) < _CACHE_LIMIT:
            self._owns[size] = own
        return own

    def _tail(self, attempt: int, status: int | None, error: str | None, outcome: str) -> bytes:
        """An attempt span's attributes after its delivery id, and its status: the same for
        every attempt with the same number, response status and outcome (cached by those;
        an error's text, never)."""
        attribute = self._attribute
        own = [attribute("gateway.delivery.attempt", attempt)]
        if attempt > 1:
            own.append(attribute("http.request.resend_count", attempt - 1))
        if status is None:
            own += [attribute(k, v) for k, v in status_attributes(None, error).items()]
        else:
            own.append(self._statuses.get(status) or self._status(status))
        own.append(attribute("gateway.delivery.outcome", outcome))
        if outcome != "delivered":
            own.append(_ERROR_STATUS)
        encoded = b"".join(own)
        if status is not None and len(self._tails) < _CACHE_LIMIT:
            self._tails[attempt, status, outcome] = encoded
        return encoded

    def _status(self, status: int) -> bytes:
        """A response's attributes (its status code, and error.type from 400 on)."""
        encoded = self._statuses[status] = b"".join(
            [self._attribute(k, v) for k, v in status_attributes(status, None).items()]
        )
        return encoded

    def _result(self, deliveries: int) -> bytes:
        """A commit's attributes, by the deliveries it stored (:data:`DUPLICATE`: none)."""
        duplicate = deliveries == DUPLICATE
        encoded = self._attribute("gateway.duplicate", duplicate) + self._attribute(
            "gateway.deliveries", 0 if duplicate else deliveries
        )
        if len(self._results) < _CACHE_LIMIT:
            self._results[deliveries] = encoded
        return encoded

    def _overridden(self, shared: Mapping[str, Any], changed: Mapping[str, Any]) -> bytes:
        """A shared attribute set again: the span's own value wins."""
        attribute = self._attribute
        return b"".join(
            [attribute(k, v) for k, v in shared.items() if k not in changed]
            + [attribute(k, v) for k, v in changed.items()]
        )

    @staticmethod
    def _links(links: Sequence[tuple[bytes, bytes, int, Mapping[str, Any]]]) -> bytes:
        return b"".join(
            _field(
                b"\x6a",
                _IDS(b"\x0a\x10", trace_id, b"\x12\x08", span_id)
                + key_values(b"\x22", link_attributes)
                + b"\x35"
                + _FIXED32(link_flags | _HAS_IS_REMOTE | _IS_REMOTE),
            )
            for trace_id, span_id, link_flags, link_attributes in links
        )

    def encode(self, spans: Iterable[Span]) -> bytes:
        """One ExportTraceServiceRequest holding ``spans``."""
        span = self.span
        return self.request([span(each) for each in spans])

    def request(self, encoded: Sequence[bytes]) -> bytes:
        """One ExportTraceServiceRequest holding spans already encoded by :meth:`span`, made
        in one join: the lengths of the nested fields are summed, not found by copying the
        batch into each field in turn (a batch is a few hundred kilobytes)."""
        scope_size = len(self._scope) + sum(map(len, encoded))
        scope_head = b"\x12" + _varint(scope_size)
        resource_size = len(self._resource) + len(scope_head) + scope_size
        return b"".join(
            [b"\x0a" + _varint(resource_size), self._resource, scope_head, self._scope, *encoded]
        )
