"""The OTLP/HTTP collector spans are posted to: where, with which headers, TLS files, timeout
and compression, from ``[tracing]`` and the standard ``OTEL_*`` variables, and one export
posted with the retries OTLP/HTTP asks for.

Rule: the variables are read once, at start, as OpenTelemetry's own OTLP/HTTP exporter reads
them (``OTEL_EXPORTER_OTLP_TRACES_*`` before ``OTEL_EXPORTER_OTLP_*``; the endpoint of
``[tracing]`` before either); a header's value (a vendor's API key) is never logged.
"""

from __future__ import annotations

import gzip
import http.client
import logging
import random
import ssl
import threading
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import unquote, urlsplit

from gateway.config.rules import host_name_problem
from gateway.errors import ConfigError
from gateway.units import SECONDS

__all__ = ["Collector", "collector_from"]

log = logging.getLogger(__name__)

_DEFAULT_ENDPOINT: Final = "http://localhost:4318/"
_TRACES_PATH: Final = "v1/traces"
_DEFAULT_TIMEOUT_S: Final = 10 * SECONDS
# OTLP/HTTP: these answers (and no answer at all) may be retried, with exponential backoff.
_RETRYABLE: Final = frozenset({429, 502, 503, 504})
_MAX_TRIES: Final = 6
# The headers that say how the request is framed and what its body is, which the exporter
# sets itself: OTLP/HTTP says the client MUST send "Content-Type: application/x-protobuf" with
# a binary protobuf body and MUST send "Content-Encoding: gzip" when (and only when) it gzips
# it; Content-Length (or Transfer-Encoding) and Host are http.client's, made from the body and
# the URL. Given in OTEL_EXPORTER_OTLP_HEADERS as well, one would go out beside the exporter's
# own (two Content-Types) or in its stead (a length or coding that is not the body's), and the
# collector could refuse or misread every export.
_FRAMING: Final = frozenset(
    {"content-type", "content-encoding", "content-length", "transfer-encoding", "host"}
)


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


def _postable(url: str, source: str) -> str:
    """``url``, checked once at start as the exporter's thread will use it: an http(s) URL with
    a port in range and a host name DNS can carry (each label 1 to 63 characters, as IDNA
    encodes it for the resolver). Otherwise ConfigError naming ``source``, the key or variable
    that gave it; the URL is not repeated (it may carry credentials), only why it fails."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # ValueError: not a number in 0..65535
    except ValueError as exc:
        raise ConfigError(f"{source}: not a collector URL to post to: {exc}") from None
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https") or not host:
        raise ConfigError(f"{source}: expected an http:// or https:// URL with a host")
    problem = host_name_problem(host)  # an empty or over-long label
    if problem is not None:
        raise ConfigError(f"{source}: not a collector URL to post to: {problem}")
    return url


def collector_from(endpoint: str | None, env: Mapping[str, str]) -> Collector:
    """The collector of ``[tracing] endpoint`` (a base URL: spans go to its /v1/traces) and the
    ``OTEL_EXPORTER_OTLP_*`` variables in ``env``. A URL the exporter could not post to raises
    ConfigError: at start, rather than in the exporter's thread at the first export."""
    if endpoint is not None:
        url = _postable(endpoint.rstrip("/") + "/" + _TRACES_PATH, "tracing.endpoint")
    elif traces := env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        # The signal's own URL, used as it is.
        url = _postable(traces, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    else:
        base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or _DEFAULT_ENDPOINT
        url = _postable(base.rstrip("/") + "/" + _TRACES_PATH, "OTEL_EXPORTER_OTLP_ENDPOINT")
    headers = _parsed_headers(_variable(env, "HEADERS") or "")
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


def _parsed_headers(raw: str) -> dict[str, str]:
    """``OTEL_EXPORTER_OTLP_[TRACES_]HEADERS``: ``name=value`` entries separated by commas,
    percent-encoded as the specification says (or not, as OpenTelemetry's SDKs accept), names
    in lower case. An entry that is not ``name=value`` is left out with a warning that shows
    none of it: OpenTelemetry's own parser (``parse_env_headers``) logs such an entry whole,
    and it is most often a secret written the wrong way (``Authorization: Bearer <token>``)."""
    found = {}
    for entry in raw.split(","):
        if not entry.strip():
            continue
        name, equals, value = entry.partition("=")
        name = unquote(name).strip().lower()
        if not equals or not name:
            log.warning(
                "an OTLP header is not name=value (not shown: it may hold a secret); not sent"
            )
            continue
        found[name] = unquote(value).strip()
    return found


def _sendable(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers that can go out as they are. One that would break the request's framing (a
    line break, a colon or white space in its name) or that HTTP/1.1 cannot carry (a name
    outside ASCII, a value outside Latin-1) is left out with a warning: ``http.client`` would
    raise on it in the exporter's thread at every export, and no span would ever be sent. So is
    one the exporter sets itself (``_FRAMING``: Content-Type, Content-Encoding, Content-Length,
    Transfer-Encoding, Host), in any case. The warning names a header only by a valid name,
    never by its value nor by a name that is not one: such a name is most often a value written
    into it (``Authorization: Bearer <token>`` for ``Authorization=Bearer <token>``)."""
    kept = {}
    for name, value in headers.items():
        valid_name = _valid_name(name)
        if valid_name and name.lower() in _FRAMING:
            log.warning(
                "OTLP header %r is set by the exporter itself, from the request it sends;"
                " not sent from OTEL_EXPORTER_OTLP_HEADERS",
                name,
            )
        elif valid_name and _valid_value(value):
            kept[name] = value
        elif valid_name:
            log.warning("OTLP header %r has a value HTTP/1.1 cannot carry; not sent", name)
        else:
            log.warning(
                "an OTLP header's name is not a valid HTTP header name (not shown: it may hold"
                " a secret); not sent"
            )
    return kept


def _valid_name(name: str) -> bool:
    return name.isascii() and bool(name) and not any(c in name for c in ":\r\n \t")


def _valid_value(value: str) -> bool:
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return "\r" not in value and "\n" not in value


class Poster:
    """Posts encoded export requests to one collector (from one thread at a time)."""

    def __init__(self, collector: Collector, stopping: threading.Event) -> None:
        self._collector = collector
        self._stopping = stopping
        self._headers = {"Content-Type": "application/x-protobuf", **_sendable(collector.headers)}
        if collector.compression != "none":
            self._headers["Content-Encoding"] = collector.compression
        self._parts = urlsplit(collector.url)
        self._path = self._parts.path or "/"
        if self._parts.query:
            self._path += "?" + self._parts.query
        self._timeout = collector.timeout_s
        self._kept: http.client.HTTPConnection | None = None
        self._context: ssl.SSLContext | None = None
        if collector.url.startswith("https:"):
            self._context = ssl.create_default_context(cafile=collector.ca_file)
            if collector.cert_file is not None:
                self._context.load_cert_chain(collector.cert_file, collector.key_file)

    def _compress(self, body: bytes) -> bytes:
        if self._collector.compression == "gzip":
            return gzip.compress(body)
        if self._collector.compression == "deflate":
            return zlib.compress(body)
        return body

    def _connection(self) -> http.client.HTTPConnection:
        if self._kept is None:
            host, port, timeout = self._parts.hostname or "", self._parts.port, self._timeout
            if self._context is None:
                self._kept = http.client.HTTPConnection(host, port, timeout=timeout)
            else:
                self._kept = http.client.HTTPSConnection(
                    host, port, timeout=timeout, context=self._context
                )
        return self._kept

    def close(self) -> None:
        """Close the kept connection, if any."""
        if self._kept is not None:
            self._kept.close()
            self._kept = None

    def _once(self, body: bytes) -> int | None:
        """The collector's status, or None if none came back. One connection is kept between
        exports: a new one for each would cost more than the export of a small batch."""
        for fresh in (self._kept is None, True):
            try:
                connection = self._connection()
                connection.request("POST", self._path, body, self._headers)
                answer = connection.getresponse()
                answer.read()
            # ValueError: what the resolver or the socket layer raises for a name or address
            # they refuse (UnicodeError is one); a failed post all the same.
            except (OSError, http.client.HTTPException, ValueError):
                self.close()
                if fresh:
                    return None
                continue  # the collector closed the kept connection: once more, on a new one
            if answer.will_close:
                self.close()
            return int(answer.status)
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
