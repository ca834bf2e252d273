"""Plain records of the spans made on the event loop's hot paths: a traced notification at the
listener (its SERVER span and its outbox commit, :class:`Notified`) and a batch of delivery
attempts (one CLIENT span each, :class:`Attempts`).

Rule: the event loop's thread only fills in plain values (ids, times, a status, a count) and
queues a record once, when its work ends; the exporter's thread turns it into spans
(:meth:`gateway.tracing.encoding.Encoder.notified` and ``.attempts``) with the same names,
attributes, parenting and statuses as the API spans of :mod:`gateway.tracing.spans` would have
(a test compares them byte for byte). No span object and no attribute mapping is made per
request on the loop.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Final

__all__ = ["Attempt", "Attempts", "Ended", "Notified"]

# What a span that is not a root points at; a link: (trace id, span id, flags, attributes).
Link = tuple[bytes, bytes, int, Mapping[str, Any]]
NOT_REACHED: Final = -2  # ``deliveries`` before the commit's result is known
DUPLICATE: Final = -1  # ``deliveries`` of a duplicate: nothing stored


class Notified:
    """The SERVER span of one ``POST path`` (from ``start_ns`` to ``end_ns``, answered with
    ``status``) and, once the notification reached the outbox (``commit_start_ns`` set), its
    commit's span, a child of it: ``deliveries`` stored (:data:`DUPLICATE`), or ``error``, the
    type of what failed it. Ids are ints: the exporter's thread makes their bytes."""

    __slots__ = (
        "attributes",
        "commit_end_ns",
        "commit_id",
        "commit_start_ns",
        "count",
        "deliveries",
        "end_ns",
        "error",
        "links",
        "path",
        "sampled",
        "server_id",
        "start_ns",
        "status",
        "trace_id",
    )

    def __init__(
        self,
        path: str,
        attributes: Mapping[str, Any],
        trace_id: int,
        server_id: int,
        commit_id: int,
        sampled: bool,
        links: Sequence[Link],
    ) -> None:
        self.path = path
        self.attributes = attributes  # the connection's, shared and never changed
        self.trace_id = trace_id
        self.server_id = server_id
        self.commit_id = commit_id
        self.sampled = sampled
        self.links = links
        self.start_ns = time.time_ns()
        self.commit_start_ns = 0  # 0: the outbox was not reached (a rejection before it)
        self.count = 1  # how many spans this record becomes: 2 once the commit starts
        self.commit_end_ns = 0
        self.deliveries = NOT_REACHED
        self.error: str | None = None
        self.end_ns = 0
        self.status = 0

    def committing(self) -> None:
        """The notification goes to the outbox now."""
        self.commit_start_ns = time.time_ns()
        self.count = 2

    def committed(self, stored: Sequence[object] | None) -> None:
        """The outbox committed it: ``stored``, its deliveries (``None``: a duplicate)."""
        self.commit_end_ns = time.time_ns()
        self.deliveries = DUPLICATE if stored is None else len(stored)


# One attempt's span: (trace id, span id, parent span id or b"", tracestate, sampled, delivery
# id, attempt number).
Attempt = tuple[bytes, bytes, bytes, str, bool, str, int]
# How one attempt ended: (response status or None, error text or None, outcome).
Ended = tuple[int | None, str | None, str]


class Attempts:
    """The CLIENT spans of one batch of attempts to one target: named ``name``, with the
    target's ``shared`` attributes, started together at ``start_ns``; ``headers``: the
    trace context each attempt carries to the target. ``ended``: how each ended, in order,
    at ``end_ns`` (set once)."""

    __slots__ = ("count", "end_ns", "ended", "headers", "name", "shared", "spans", "start_ns")

    def __init__(
        self,
        name: str,
        shared: Mapping[str, Any],
        spans: list[Attempt],
        headers: list[dict[str, str]],
        count: int,
    ) -> None:
        self.name = name
        self.shared = shared
        self.spans = spans
        self.headers = headers
        self.count = count  # how many of the spans are sampled (the others are not recorded)
        self.start_ns = time.time_ns()
        self.end_ns = 0
        self.ended: Sequence[Ended] = ()
