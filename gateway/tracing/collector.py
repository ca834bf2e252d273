"""The OTLP/HTTP collector spans are posted to: where, with which headers, TLS files, timeout
and compression, from ``[tracing]`` and the standard ``OTEL_*`` variables, and one export
posted with the retries OTLP/HTTP asks for.

Rule: the variables are read once, at start, as OpenTelemetry's own OTLP/HTTP exporter reads
them (``OTEL_EXPORTER_OTLP_TRACES_*`` before ``OTEL_EXPORTER_OTLP_*``; the endpoint of
``[tracing]`` before either), and the TLS files they name are checked then; a header's value (a
vendor's API key) and the URL's credentials are never logged. An export reads no more of the
collector's answer than OTLP's answers need, and gives up at the deadline it is given.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import gzip
import http.client
import logging
import math
import random
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final
from urllib.parse import unquote, urlsplit

from gateway.config.rules import host_name_problem
from gateway.errors import CertificateError, ConfigError
from gateway.tlsfiles import at, check_ca_bundle, check_key_pair, load
from gateway.units import SECONDS

__all__ = ["Collector", "collector_from"]

log = logging.getLogger(__name__)

_DEFAULT_ENDPOINT: Final = "http://localhost:4318/"
_TRACES_PATH: Final = "v1/traces"
_DEFAULT_TIMEOUT_S: Final = 10 * SECONDS
# OTLP/HTTP: these answers (and no answer at all) may be retried, with exponential backoff.
_RETRYABLE: Final = frozenset({429, 502, 503, 504})
_MAX_TRIES: Final = 6
# The longest wait a collector's Retry-After is followed for: the batch holds the exporter (and
# the queue behind it) while it waits, so not for as long as a collector pleases.
_MAX_RETRY_AFTER_S: Final = 60 * SECONDS
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
# The most of a collector's answer read. OTLP/HTTP's answers are an ExportTraceServiceResponse
# (empty, or a partial success: a count and one message) or a google.rpc.Status, a few hundred
# bytes; anything longer is not the collector's (a proxy's page, a wrong endpoint's stream) and
# is not kept in memory whole. An answer not read to its end closes the connection.
_ANSWER_LIMIT: Final = 64 * 1024
# How much of a collector's partial-success message a warning shows.
_SHOWN_MESSAGE: Final = 200


def _named(env: Mapping[str, str], name: str) -> tuple[str, str | None]:
    """``OTEL_EXPORTER_OTLP_TRACES_<name>``, else ``OTEL_EXPORTER_OTLP_<name>``: the variable
    that gives the value (the general one when neither does), and the value."""
    for variable in (f"OTEL_EXPORTER_OTLP_TRACES_{name}", f"OTEL_EXPORTER_OTLP_{name}"):
        value = env.get(variable)
        if value:
            return variable, value
    return f"OTEL_EXPORTER_OTLP_{name}", None


def _variable(env: Mapping[str, str], name: str) -> str | None:
    """``OTEL_EXPORTER_OTLP_TRACES_<name>``, else ``OTEL_EXPORTER_OTLP_<name>``."""
    return _named(env, name)[1]


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
    # The variable each of the files above came from ("ca_file": its name, ...), for the
    # message that refuses it: where a setting came from, not part of it.
    file_variables: Mapping[str, str] = field(default_factory=dict, compare=False)

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
    except ValueError:
        # Not urlsplit's own message: it quotes what it could not read, which may be the
        # credentials (the whole "user:password@host" of a netloc it refuses, or, where a
        # password holds a "/" not percent-encoded, the password's first part as the port).
        raise ConfigError(
            f"{source}: not a collector URL to post to: its host or port cannot be read"
            " (a '/', '?', '#' or '@' in a user name or password must be percent-encoded)"
        ) from None
    if "@" in parts.path + parts.query + parts.fragment:
        # A password with a "/", "?" or "#" not percent-encoded ends the authority there
        # (RFC 3986, section 3.2): a password of digits up to it reads as a port, and the rest
        # would go out as the path, to the user name taken for the host. No collector URL
        # needs an "@" there that could not be written %40.
        raise ConfigError(
            f"{source}: not a collector URL to post to: an '@' after the host"
            " (a '/', '?', '#' or '@' in a user name or password must be percent-encoded)"
        )
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
    ca_variable, ca_file = _named(env, "CERTIFICATE")
    cert_variable, cert_file = _named(env, "CLIENT_CERTIFICATE")
    key_variable, key_file = _named(env, "CLIENT_KEY")
    return Collector(
        url=url,
        headers=headers,
        timeout_s=timeout_s,
        compression=compression,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        file_variables={
            "ca_file": ca_variable,
            "cert_file": cert_variable,
            "key_file": key_variable,
        },
    )


def _client_context(collector: Collector) -> ssl.SSLContext:
    """The TLS context of an https collector: its CA file's certificates alone, else the
    system's trust store, and the client certificate, if one is given. Each file is read and
    checked first, as a target's are (:mod:`gateway.tlsfiles`): one that is missing, holds no
    PEM, is the key of another certificate or an encrypted key (OpenSSL would prompt for its
    passphrase on the terminal of a gateway that starts unattended) is a
    :class:`~gateway.errors.CertificateError` naming the variable and the file, at start."""
    names = collector.file_variables
    ca_variable = names.get("ca_file", "OTEL_EXPORTER_OTLP_CERTIFICATE")
    if collector.ca_file is None:
        context = ssl.create_default_context()  # the system's trust store
    else:
        ca_file = Path(collector.ca_file)
        check_ca_bundle(ca_file, ca_variable)
        try:  # its certificates alone, not the system's trust store besides
            context = ssl.create_default_context(cafile=ca_file)
        except OSError as exc:  # ssl.SSLError is an OSError
            raise CertificateError(
                f"{at(ca_variable, ca_file)}: OpenSSL refused it: {exc}"
            ) from exc
    cert_file = collector.cert_file
    if cert_file is not None:
        cert_variable = names.get("cert_file", "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE")
        # Without a key file, the certificate's file holds the key too (as OpenTelemetry's
        # own exporters take it).
        key_file = collector.key_file or cert_file
        key_variable = (
            names.get("key_file", "OTEL_EXPORTER_OTLP_CLIENT_KEY")
            if collector.key_file
            else cert_variable
        )
        check_key_pair(Path(cert_file), cert_variable, Path(key_file), key_variable)
        load(cert_variable, Path(cert_file), lambda: context.load_cert_chain(cert_file, key_file))
    return context


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


def _basic_authorization(username: str | None, password: str | None) -> str | None:
    """The ``Authorization`` header of a URL's user name and password (HTTP Basic, RFC 7617),
    or None where it has none. OpenTelemetry's own OTLP/HTTP exporter sends them so (its
    HTTP client takes a URL's credentials): dropped, as http.client drops them, every export
    to a collector that asks for them would be refused. They are percent-decoded, as a URL
    holds them, then encoded as UTF-8 (RFC 7617, section 2.1: the charset a server may ask
    for, and the only one that can carry any password)."""
    if username is None:
        return None
    credentials = f"{unquote(username)}:{unquote(password or '')}".encode()
    return "Basic " + base64.b64encode(credentials).decode("ascii")


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
        basic = _basic_authorization(self._parts.username, self._parts.password)
        if basic is not None and not any(k.lower() == "authorization" for k in self._headers):
            self._headers["Authorization"] = basic
        self._path = self._parts.path or "/"
        if self._parts.query:
            self._path += "?" + self._parts.query
        self._timeout = collector.timeout_s
        self._kept: http.client.HTTPConnection | None = None
        self._aborted = False  # set by abort(), from another thread: no new try after it
        self._context: ssl.SSLContext | None = None
        if collector.url.startswith("https:"):
            self._context = _client_context(collector)

    def _compress(self, body: bytes) -> bytes:
        if self._collector.compression == "gzip":
            return gzip.compress(body)
        if self._collector.compression == "deflate":
            return zlib.compress(body)
        return body

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        """The kept connection (a new one if none is kept), each of its socket's operations
        limited to ``timeout``."""
        kept = self._kept
        if kept is None:
            host, port = self._parts.hostname or "", self._parts.port
            if self._context is None:
                kept = http.client.HTTPConnection(host, port, timeout=timeout)
            else:
                kept = http.client.HTTPSConnection(
                    host, port, timeout=timeout, context=self._context
                )
            self._kept = kept
        elif kept.timeout != timeout:  # a final flush's: no further than its deadline
            kept.timeout = timeout
            if kept.sock is not None:
                kept.sock.settimeout(timeout)
        return kept

    def close(self) -> None:
        """Close the kept connection, if any."""
        if self._kept is not None:
            self._kept.close()
            self._kept = None

    def abort(self) -> None:
        """End the post under way, from another thread, and any try after it: its socket is
        shut down, which wakes the exporter's thread out of a send or receive that a collector
        that never answers would hold until its timeout (closing the socket would not: a
        thread blocked on it stays blocked)."""
        self._aborted = True
        kept = self._kept
        sock = None if kept is None else kept.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _once(self, body: bytes, timeout: float) -> tuple[int, bytes, str | None] | None:
        """The collector's status, (the start of) its answer and its Retry-After, or None if
        none came back. One connection is kept between exports: a new one for each would cost
        more than the export of a small batch."""
        for fresh in (self._kept is None, True):
            try:
                connection = self._connection(timeout)
                connection.request("POST", self._path, body, self._headers)
                answer = connection.getresponse()
                content = answer.read(_ANSWER_LIMIT)
            # ValueError: what the resolver or the socket layer raises for a name or address
            # they refuse (UnicodeError is one); a failed post all the same.
            except (OSError, http.client.HTTPException, ValueError):
                self.close()
                if fresh or self._aborted:
                    return None
                continue  # the collector closed the kept connection: once more, on a new one
            # Not read to its end (longer than any answer of OTLP's): the rest would be taken
            # for the next export's answer, so the connection is not kept.
            if answer.will_close or not answer.isclosed():
                self.close()
            return int(answer.status), content, answer.getheader("Retry-After")
        return None

    def post(self, body: bytes, spans: int, deadline: float = math.inf) -> int:
        """Post one export request of ``spans`` spans, retrying what OTLP/HTTP says may be
        retried, and trying nothing past ``deadline`` (``time.monotonic()``); how many of the
        spans the collector took: all, none, or those a partial success did not reject."""
        data = self._compress(body)
        status: int | None = None
        for attempt in range(_MAX_TRIES):
            left = deadline - time.monotonic()
            if left <= 0 or self._aborted:
                break
            answered = self._once(data, min(self._timeout, left))
            status = None if answered is None else answered[0]
            if answered is not None and 200 <= answered[0] < 300:
                return spans - self._rejected(answered[1], spans)
            if status is not None and status not in _RETRYABLE:
                break
            backoff = 2**attempt * random.uniform(0.8, 1.2)
            if answered is not None:
                # OTLP/HTTP: a client SHOULD wait as long as a throttling collector's
                # Retry-After asks (its backoff alone may come back sooner).
                backoff = max(backoff, _retry_after_s(answered[2]))
            if attempt + 1 == _MAX_TRIES or self._stopping.wait(backoff):
                break
        log.warning(
            "dropped %d spans: the collector at %s answered %s",
            spans,
            self._collector.where(),
            "nothing" if status is None else status,
        )
        return 0

    def _rejected(self, content: bytes, spans: int) -> int:
        """The spans of a successful export that its answer says were rejected (OTLP/HTTP,
        "Partial Success": a 200 whose partial_success gives their number and why; they must
        not be sent again), warned of; 0 for a full success."""
        rejected, message = _partial_success(content)
        rejected = min(max(rejected, 0), spans)
        if rejected:
            log.warning(
                "the collector at %s rejected %d of %d spans: %r",
                self._collector.where(),
                rejected,
                spans,
                message[:_SHOWN_MESSAGE],  # as repr: the collector's text, on one line
            )
        return rejected


def _retry_after_s(value: str | None) -> float:
    """A Retry-After header's wait in seconds (RFC 9110, section 10.2.3: delay-seconds or an
    HTTP-date), at most ``_MAX_RETRY_AFTER_S``; 0 for none, or for what is neither."""
    if not value:
        return 0.0
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value), _MAX_RETRY_AFTER_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 0.0
    if when.tzinfo is None:  # "-0000": a time with no zone said, so no wait can be had from it
        return 0.0
    wait = (when - datetime.now(UTC)).total_seconds()
    return min(max(wait, 0.0), _MAX_RETRY_AFTER_S)


def _varint_at(data: bytes, offset: int) -> tuple[int, int]:
    """The protobuf varint at ``offset`` and the offset after it; ValueError past the end."""
    value = shift = 0
    while True:
        if offset >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, offset


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """A protobuf message's fields as (number, value): a varint's int, a length-delimited
    field's bytes (fixed-size ones skipped); ValueError if it is not one."""
    found: list[tuple[int, int | bytes]] = []
    offset = 0
    while offset < len(data):
        key, offset = _varint_at(data, offset)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, offset = _varint_at(data, offset)
            found.append((number, value))
        elif wire == 2:
            size, offset = _varint_at(data, offset)
            if offset + size > len(data):
                raise ValueError("truncated field")
            found.append((number, data[offset : offset + size]))
            offset += size
        elif wire in (1, 5):
            offset += 8 if wire == 1 else 4
        else:
            raise ValueError("not a wire type of a message's field")
    if offset != len(data):
        raise ValueError("truncated field")
    return found


def _partial_success(content: bytes) -> tuple[int, str]:
    """The spans an ExportTraceServiceResponse rejects and why: its partial_success (field 1)
    holds rejected_spans (1, an int64) and error_message (2). (0, "") for an empty answer (a
    full success) and for what is no such message (a collector may answer 200 with anything)."""
    rejected, message = 0, ""
    try:
        for number, value in _fields(content):
            if number != 1 or not isinstance(value, bytes):
                continue
            for inner, part in _fields(value):
                if inner == 1 and isinstance(part, int):
                    rejected = part - (1 << 64) if part >= 1 << 63 else part  # an int64
                elif inner == 2 and isinstance(part, bytes):
                    message = part.decode("utf-8", "replace")
    except ValueError:
        return 0, ""
    return rejected, message
