"""The gateway's spans: what each one is named and carries, made through opentelemetry-api only.

Rule: nothing here knows the exporter, and nothing here is reached with tracing off: the request
path and the dispatcher hold a :class:`Tracing` only when ``[tracing] enabled = true``, so an
untraced gateway builds no span object. Attributes follow OpenTelemetry's stable HTTP semantic
conventions; none carries personal data (no body, phone number, user id, name, message text,
secret or token): only the method, path, status, the client certificate's CN and expiry, the
target's name, the delivery id and the attempt's outcome.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import urlsplit

from opentelemetry.context import Context
from opentelemetry.trace import (
    Link,
    Span,
    SpanKind,
    Status,
    StatusCode,
    Tracer,
    get_current_span,
    set_span_in_context,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = [
    "Tracing",
    "client_attributes",
    "join_carrier",
    "not_after_iso",
    "split_carrier",
    "status_attributes",
]

_PROPAGATOR: Final = TraceContextTextMapPropagator()
# A traceparent and its tracestate stored as one text: W3C trace context never holds a newline.
_SEPARATOR: Final = "\n"


def join_carrier(carrier: dict[str, str]) -> str | None:
    """The stored form of an injected trace context: traceparent, then tracestate if any."""
    parent = carrier.get("traceparent")
    if parent is None:
        return None
    state = carrier.get("tracestate")
    return f"{parent}{_SEPARATOR}{state}" if state else parent


def split_carrier(stored: str | None) -> dict[str, str]:
    """The headers a stored trace context stands for (see :func:`join_carrier`)."""
    if not stored:
        return {}
    parent, _, state = stored.partition(_SEPARATOR)
    return {"traceparent": parent, "tracestate": state} if state else {"traceparent": parent}


def not_after_iso(not_after: str | None) -> str | None:
    """A certificate's notAfter as Python's ssl module spells it, in ISO 8601 (UTC)."""
    if not not_after:
        return None
    try:
        seconds = ssl.cert_time_to_seconds(not_after)
    except ValueError:
        return None
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_attributes(status: int | None, error: str | None) -> dict[str, Any]:
    """A response's attributes: its status code, and ``error.type`` for a failure (the status
    as text from 400 on, or the kind of error when nothing came back)."""
    if status is None:
        kind = (error or "no response").split(" ", 1)[0].rstrip(":")
        return {"error.type": "timeout" if kind == "timed" else kind or "_OTHER"}
    found: dict[str, Any] = {"http.response.status_code": status}
    if status >= 400:
        found["error.type"] = str(status)
    return found


def client_attributes(
    url: str, target: str, delivery_id: str, attempt: int, kind: str = "http"
) -> dict[str, Any]:
    """A delivery attempt's attributes before it is sent: for an HTTP target the URL without
    credentials or query (either may hold a secret), for a broker (``kind``) its first
    server's host and port alone."""
    found: dict[str, Any] = {
        "gateway.target.name": target,
        "gateway.delivery.id": delivery_id,
        "gateway.delivery.attempt": attempt,
    }
    if attempt > 1:
        found["http.request.resend_count"] = attempt - 1
    try:
        parts = urlsplit(url.split(",", 1)[0])  # a NATS target may list several servers
        port = parts.port
    except ValueError:
        return found
    if kind != "http":
        found["messaging.system"] = kind
        found["server.address"] = parts.hostname or ""
        if port is not None:
            found["server.port"] = port
    else:
        port = port or (443 if parts.scheme == "https" else 80)
        found["http.request.method"] = "POST"
        found["server.address"] = parts.hostname or ""
        found["server.port"] = port
        found["url.full"] = f"{parts.scheme}://{parts.hostname}:{port}{parts.path or '/'}"
    return found


class Tracing:
    """Makes the gateway's spans with ``tracer`` (see :mod:`gateway.tracing.export`)."""

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer

    def server_span(
        self, path: str, cn: str | None, not_after: str | None, foreign: str | None
    ) -> Span:
        """The SERVER span of one ``POST path`` at the callback. Always a root: Meta sends no
        traceparent, and anyone else's (``foreign``) is only recorded as a link."""
        attributes: dict[str, Any] = {
            "http.request.method": "POST",
            "http.route": path,
            "url.path": path,
            "url.scheme": "https",
            "network.protocol.version": "1.1",
        }
        if cn is not None:
            attributes["tls.client.subject"] = f"CN={cn}"
        expiry = not_after_iso(not_after)
        if expiry is not None:
            attributes["tls.client.not_after"] = expiry
        links = []
        if foreign is not None:
            linked = get_current_span(_PROPAGATOR.extract({"traceparent": foreign}))
            if linked.get_span_context().is_valid:
                links.append(Link(linked.get_span_context(), {"gateway.link": "untrusted"}))
        return self._tracer.start_span(
            f"POST {path}",
            context=Context(),  # a root, whatever the caller's context holds
            kind=SpanKind.SERVER,
            attributes=attributes,
            links=links,
        )

    @staticmethod
    def end_server(span: Span, status: int) -> None:
        """End a SERVER span with the status the callback answered."""
        span.set_attributes(status_attributes(status, None))
        if status >= 500:  # 4xx is the client's error, not the server's (semantic conventions)
            span.set_status(Status(StatusCode.ERROR))
        span.end()

    def commit_span(self, server: Span) -> Span:
        """The outbox commit of a notification, a child of its SERVER span."""
        return self._tracer.start_span(
            "outbox commit", context=set_span_in_context(server, Context())
        )

    @staticmethod
    def committed(commit: Span, deliveries: int | None) -> None:
        """A commit's result: how many deliveries it stored (``None``: a duplicate, none)."""
        commit.set_attributes(
            {"gateway.duplicate": deliveries is None, "gateway.deliveries": deliveries or 0}
        )

    @staticmethod
    def failed(span: Span, exc: BaseException) -> None:
        """A span whose work raised: the error's type only (its text may name anything)."""
        span.set_attribute("error.type", type(exc).__qualname__)
        span.set_status(Status(StatusCode.ERROR))

    @staticmethod
    def stored(server: Span) -> str | None:
        """The trace context kept with a notification's deliveries: its SERVER span's."""
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=set_span_in_context(server, Context()))
        return join_carrier(carrier)

    def attempt_spans(
        self,
        url: str,
        target: str,
        deliveries: Sequence[tuple[str, str | None, int]],
        kind: str = "http",
    ) -> list[tuple[Span, dict[str, str]]]:
        """One CLIENT span per attempt ``(delivery id, stored trace context, attempt number)``,
        each a child of its stored context (a root where none was stored), with the headers
        that carry it to the target. Named ``POST`` for an HTTP target (the HTTP conventions),
        ``send <target>`` for a broker (the messaging ones)."""
        made = []
        start = time.time_ns()
        for delivery_id, trace, attempt in deliveries:
            parent = _PROPAGATOR.extract(split_carrier(trace), context=Context())
            span = self._tracer.start_span(
                "POST" if kind == "http" else f"send {target}",
                context=parent,
                kind=SpanKind.CLIENT,
                attributes=client_attributes(url, target, delivery_id, attempt, kind),
                start_time=start,
            )
            headers: dict[str, str] = {}
            _PROPAGATOR.inject(headers, context=set_span_in_context(span, Context()))
            made.append((span, headers))
        return made

    @staticmethod
    def end_attempt(span: Span, status: int | None, error: str | None, outcome: str) -> None:
        """End an attempt's span with what came back and what it led to (delivered, retry,
        dead)."""
        span.set_attributes(status_attributes(status, error))
        span.set_attribute("gateway.delivery.outcome", outcome)
        if outcome != "delivered":
            span.set_status(Status(StatusCode.ERROR))
        span.end()
