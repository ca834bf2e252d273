"""W3C Trace Context (https://www.w3.org/TR/trace-context/): the ``traceparent`` header read and
written, and the form a trace context is stored in with a notification's deliveries.

Rule: text in, values out; no span, no clock, no randomness. What is not a valid traceparent is
no parent at all (``None``), never an error: a caller who sends nonsense gets a root span.
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple

__all__ = [
    "SAMPLED",
    "Parent",
    "format_traceparent",
    "parse_stored",
    "parse_traceparent",
]

# Version, trace id, parent id, flags; a later version may add fields after a dash (section 4.3).
_TRACEPARENT: Final = re.compile(
    r"[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[^ \t]*)?[ \t]*"
)
# The form this gateway writes (and a version-00 sender most often sends), read without groups.
_CANONICAL: Final = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
# A traceparent and its tracestate stored as one text: W3C trace context never holds a newline.
_SEPARATOR: Final = "\n"
SAMPLED: Final = 0x01
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16


class Parent(NamedTuple):
    """A span context received from elsewhere: the parent of a span made here. Ids as bytes,
    as OTLP sends them."""

    trace_id: bytes
    span_id: bytes
    flags: int
    trace_state: str = ""


# A Parent made from a tuple without the generated __new__'s keyword handling (a third of the
# time of this whole parse).
_new_parent: Final = tuple.__new__


def parse_traceparent(header: str | None, trace_state: str = "") -> Parent | None:
    """The span context a ``traceparent`` header carries, or None where it carries none: not
    the format, version ``ff``, a version-00 header with more after it, or an all-zero id."""
    if not header:
        return None
    if _CANONICAL.fullmatch(header) is not None:  # the common case, in a quarter of the time
        trace_hex, span_hex = header[3:35], header[36:52]
        if trace_hex == _ZERO_TRACE or span_hex == _ZERO_SPAN:
            return None
        ids = (bytes.fromhex(trace_hex), bytes.fromhex(span_hex), int(header[53:], 16))
        return _new_parent(Parent, (*ids, trace_state.strip()))
    found = _TRACEPARENT.fullmatch(header)
    if found is None:
        return None
    version, trace_hex, span_hex, flags_hex, rest = found.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    if trace_hex == _ZERO_TRACE or span_hex == _ZERO_SPAN:
        return None
    flags = int(flags_hex, 16)
    return Parent(bytes.fromhex(trace_hex), bytes.fromhex(span_hex), flags, trace_state.strip())


def format_traceparent(trace_id: bytes, span_id: bytes, sampled: bool) -> str:
    """The version-00 ``traceparent`` of a span made here."""
    return f"00-{trace_id.hex()}-{span_id.hex()}-{'01' if sampled else '00'}"


def parse_stored(stored: str | None) -> Parent | None:
    """The span context of a trace context stored with a delivery: its traceparent, then, if
    there is one, a newline and its tracestate (W3C trace context never holds a newline)."""
    if not stored:
        return None
    parent, _, state = stored.partition(_SEPARATOR)
    return parse_traceparent(parent, state)
