"""The OTLP/HTTP collector spans are posted to: where, with which headers, TLS files, timeout
and compression, from ``[tracing]`` and the standard ``OTEL_*`` variables, and one export
posted with the retries OTLP/HTTP asks for.

Rule: the variables are read once, at start, as OpenTelemetry's own OTLP/HTTP exporter reads
them (``OTEL_EXPORTER_OTLP_TRACES_*`` before ``OTEL_EXPORTER_OTLP_*``; the endpoint of
``[tracing]`` before either); a header's value (a vendor's API key) is never logged.
"""

from __future__ import annotations

import gzip
import logging
import random
import ssl
import threading
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlsplit

from opentelemetry.util.re import parse_env_headers

from gateway.tracing.wire import Connection
from gateway.units import SECONDS

__all__ = ["Collector", "collector_from"]

log = logging.getLogger(__name__)

_DEFAULT_ENDPOINT: Final = "http://localhost:4318/"
_TRACES_PATH: Final = "v1/traces"
_DEFAULT_TIMEOUT_S: Final = 10 * SECONDS
# OTLP/HTTP: these answers (and no answer at all) may be retried, with exponential backoff.
_RETRYABLE: Final = frozenset({429, 502, 503, 504})
_MAX_TRIES: Final = 6


def _variable(env: Mapping[str, str], name: str) -> str | None:
    """``OTEL_EXPORTER_OTLP_TRACES_<name>``, else ``OTEL_EXPORTER_OTLP_<name>``."""
    return env.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}") or env.get(f"OTEL_EXPORTER_OTLP_{name}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Collector:
    """Where and how a batch of spans is posted."""

    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = _DEFAULT_TIMEOUT_S
    compression: str = "none"  # or "gzip", "deflate"
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def where(self) -> str:
        """The collector as a log line may name it: scheme, host and port, nothing else."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.hostname}:{parts.port or ''}".rstrip(":")


def _timeout_s(raw: str | None) -> float:
    """``OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT`` in seconds: the variable is in milliseconds (the
    OpenTelemetry specification's "Configuration options" of the OTLP exporter), 10 s when
    unset; one that is not a positive number is warned of and left at 10 s."""
    if not raw:
        return _DEFAULT_TIMEOUT_S
    try:
        timeout_ms = float(raw)
    except ValueError:
        timeout_ms = 0.0
    if not 0 < timeout_ms < float("inf"):
        log.warning(
            "OTLP timeout %r is not a positive number of milliseconds; using %d ms",
            raw,
            _DEFAULT_TIMEOUT_S * 1000,
        )
        return _DEFAULT_TIMEOUT_S
    return timeout_ms / 1000


def collector_from(endpoint: str | None, env: Mapping[str, str]) -> Collector:
    """The collector of ``[tracing] endpoint`` (a base URL: spans go to its /v1/traces) and the
    ``OTEL_EXPORTER_OTLP_*`` variables in ``env``."""
    if endpoint is not None:
        url = endpoint.rstrip("/") + "/" + _TRACES_PATH
    elif traces := env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        url = traces  # the signal's own URL, used as it is
    else:
        base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or _DEFAULT_ENDPOINT
        url = base.rstrip("/") + "/" + _TRACES_PATH
    headers = dict(parse_env_headers(_variable(env, "HEADERS") or "", liberal=True))
    timeout_s = _timeout_s(_variable(env, "TIMEOUT"))
    compression = (_variable(env, "COMPRESSION") or "none").strip().lower()
    if compression not in ("none", "gzip", "deflate"):
        log.warning("OTLP compression %r is not none, gzip or deflate; using none", compression)
        compression = "none"
    return Collector(
        url=url,
        headers=headers,
        timeout_s=timeout_s,
        compression=compression,
        ca_file=_variable(env, "CERTIFICATE"),
        cert_file=_variable(env, "CLIENT_CERTIFICATE"),
        key_file=_variable(env, "CLIENT_KEY"),
    )


def _header_lines(headers: Mapping[str, str]) -> bytes:
    """The request's headers as they go out; one that would break the request's framing (a
    line break, a colon in its name) is left out and named in a warning (its value never)."""
    lines = []
    for name, value in headers.items():
        if not name or any(c in name for c in ":\r\n \t") or "\r" in value or "\n" in value:
            log.warning("OTLP header %r is not a valid HTTP header; not sent", name[:40])
            continue
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines).encode("latin-1", "replace")


class Poster:
    """Posts encoded export requests to one collector (from one thread at a time) over one
    kept connection (:mod:`gateway.tracing.wire`)."""

    def __init__(self, collector: Collector, stopping: threading.Event) -> None:
        self._collector = collector
        self._stopping = stopping
        parts = urlsplit(collector.url)
        path = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        host = parts.hostname or ""
        tls = collector.url.startswith("https:")
        port = parts.port or (443 if tls else 80)
        authority = f"[{host}]" if ":" in host else host
        if parts.port is not None:
            authority += f":{parts.port}"
        headers = {"Content-Type": "application/x-protobuf", **collector.headers}
        if collector.compression != "none":
            headers["Content-Encoding"] = collector.compression
        # Everything of the head but the body's length, written once.
        self._head = f"POST {path} HTTP/1.1\r\nHost: {authority}\r\n".encode(
            "latin-1", "replace"
        ) + _header_lines(headers)
        context: ssl.SSLContext | None = None
        if tls:
            context = ssl.create_default_context(cafile=collector.ca_file)
            if collector.cert_file is not None:
                context.load_cert_chain(collector.cert_file, collector.key_file)
        self._connection = Connection(host, port, collector.timeout_s, context)

    def _compress(self, body: bytes) -> bytes:
        if self._collector.compression == "gzip":
            return gzip.compress(body)
        if self._collector.compression == "deflate":
            return zlib.compress(body)
        return body

    def close(self) -> None:
        """Close the kept connection, if any."""
        self._connection.close()

    def _once(self, body: bytes) -> int | None:
        """The collector's status, or None if none came back. One connection is kept between
        exports: a new one for each would cost more than the export of a small batch."""
        head = self._head + b"Content-Length: %d\r\n\r\n" % len(body)
        for fresh in (not self._connection.is_open, True):
            try:
                return self._connection.post(head, body)
            except OSError:
                if fresh:
                    return None
                # the collector closed the kept connection: once more, on a new one
        return None

    def post(self, body: bytes, spans: int) -> bool:
        """Post one export request, retrying what OTLP/HTTP says may be retried; whether the
        collector took it."""
        data = self._compress(body)
        status: int | None = None
        for attempt in range(_MAX_TRIES):
            status = self._once(data)
            if status is not None and 200 <= status < 300:
                return True
            if status is not None and status not in _RETRYABLE:
                break
            backoff = 2**attempt * random.uniform(0.8, 1.2)
            if attempt + 1 == _MAX_TRIES or self._stopping.wait(backoff):
                break
        log.warning(
            "dropped %d spans: the collector at %s answered %s",
            spans,
            self._collector.where(),
            "nothing" if status is None else status,
        )
        return False
