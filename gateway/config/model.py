"""The configuration's values: frozen, typed dataclasses, one per table, and their defaults.

Rule: the dataclasses are the schema. Their fields are the keys, their type hints the types,
fields without a default the required keys (:mod:`.reader` reads a table by them), and each
default lives here alone, with its unit in the key's name. Nothing here reads a file.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from gateway.units import DAYS, MINUTES, SECONDS, MiB

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "META_CLIENT_CN",
    "MIN_ADMIN_TOKEN_CHARS",
    "AdminConfig",
    "ClientAuth",
    "Config",
    "DispatcherConfig",
    "EventLoop",
    "ListenConfig",
    "LogFormat",
    "MetaConfig",
    "Order",
    "OutboxConfig",
    "Signature",
    "Split",
    "TargetConfig",
    "TargetKind",
    "TlsConfig",
    "TracingConfig",
    "nats_servers",
    "redact_servers",
    "redact_url",
    "without_user_info",
]


# Meta's webhook client certificate subject CN (docs/graph-api/webhooks/getting-started, "mTLS").
META_CLIENT_CN = "client.webhooks.fbclientcerts.com"
DEFAULT_CONFIG_PATH = Path("config/gateway.toml")
# The shortest admin token a listener beyond loopback takes: 32 characters of `openssl rand
# -hex 32` are 128 bits, out of reach of guessing even without the per-address slow-down.
MIN_ADMIN_TOKEN_CHARS = 32

ClientAuth = Literal["required", "optional", "off"]
LogFormat = Literal["text", "json"]
Split = Literal["none", "change"]
# "conversation": each conversation's deliveries to a target go in acknowledgement order
# (gateway.edge.ordering says what a conversation is); "none": no order is kept.
Order = Literal["none", "conversation"]
# How the gateway signs what it sends a target: "gateway" with X-Gateway-Signature-256 over
# timestamp "." body, "meta" with X-Hub-Signature-256 over the body, as Meta signs its own
# (whatsapp/webhooks/overview, "Validating payloads"), so a consumer written for Meta verifies it.
Signature = Literal["gateway", "meta"]
# The event loop every serving process runs on: chosen here, never by what else is installed.
EventLoop = Literal["asyncio", "uvloop"]
# Where a target's deliveries go: an HTTP endpoint, a Redis stream, or a NATS JetStream subject.
TargetKind = Literal["http", "redis", "nats"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenConfig:
    host: str = "0.0.0.0"
    port: int = 8443
    path: str = "/webhook"
    # Meta sends up to 3 MB (whatsapp/webhooks/overview); aiohttp's own default is 1 MiB.
    max_body_bytes: int = 4 * MiB
    # A keep-alive connection with no request for this long is closed.
    idle_timeout_s: float = 75 * SECONDS
    # A request whose head and body have not all arrived by then is answered 408 (slow clients
    # would otherwise hold connections open for ever).
    request_timeout_s: float = 60 * SECONDS
    # Acceptor processes sharing the supervisor's listening socket; one of them dispatches.
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    loop: EventLoop = "asyncio"
    # Every connection starts with a PROXY protocol header (v1 or v2) from a TCP load balancer (TLS
    # passthrough), which names the client; a connection without one is refused.
    proxy_protocol: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsConfig:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    client_auth: ClientAuth = "required"
    client_cn: tuple[str, ...] = (META_CLIENT_CN,)
    crl_file: Path | None = None
    session_tickets: int = 0
    # Reload by itself when the certificate, key, CA or CRL files change: cert-manager and
    # certbot renew by writing new files in place. Checked every watch_interval_s.
    watch_files: bool = False
    watch_interval_s: float = 10 * SECONDS
    # The SHA-256 fingerprints of Meta's current webhook client CA, as Meta's "mTLS for
    # Webhooks" page gives them: `waba-gateway doctor` recognises Meta's CA by these alone
    # (besides the CAs Meta documented before, which it knows).
    meta_ca_sha256: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class MetaConfig:
    verify_tokens: tuple[str, ...]
    app_secrets: tuple[str, ...]

    def __repr__(self) -> str:
        # Secrets never reach logs or tracebacks.
        return (
            f"MetaConfig(verify_tokens=<{len(self.verify_tokens)} hidden>, "
            f"app_secrets=<{len(self.app_secrets)} hidden>)"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxConfig:
    path: Path = Path("var/outbox.sqlite3")
    # PostgreSQL instead of the SQLite file at ``path``: postgresql://USER:PASSWORD@HOST:PORT/DB
    # (or ?host=/socket/dir). Several gateways may share one database.
    url: str | None = None
    # PostgreSQL: how long the deliveries a gateway claimed stay its own without a renewal. A
    # living gateway renews them every lease_s / 3; once one has died, the others take its
    # deliveries over after this.
    lease_s: float = 60 * SECONDS
    # Meta retries for up to 7 days (whatsapp/webhooks/overview): a body seen again inside this
    # window is acknowledged and not forwarded again.
    dedup_window_s: float = 7 * DAYS
    # Delivered rows older than this are removed.
    retention_s: float = 7 * DAYS
    # Dead letters older than this (since their last change) are removed, each removal logged
    # and counted: replay them before, or export them with `deliveries show`.
    dead_retention_s: float = 30 * DAYS
    # The longest a write waits for a lock another process holds on the file before the
    # requests it carries are answered 503 (Meta retries); SQLite's busy timeout.
    busy_timeout_s: float = 5 * SECONDS

    def __repr__(self) -> str:
        # The URL's password never reaches logs or tracebacks.
        where = f"url={redact_url(self.url)!r}" if self.url else f"path={str(self.path)!r}"
        return f"OutboxConfig({where})"


def redact_url(url: str) -> str:
    """``url`` with its password, if any (also a ``?password=`` parameter), replaced by ``***``:
    how messages show a database. The user name stays, to tell one login from another."""
    head, info, rest = _user_info(_PASSWORD_PARAMETER.sub(r"\1***", url))
    if info is not None:
        user, has_password, _ = info.partition(":")
        rest = f"{user}:***@{rest}" if has_password else f"{info}@{rest}"
    return head + rest


def redact_servers(url: str) -> str:
    """A target's URL (a NATS target's list of servers) as messages and ``repr`` show it: each
    server's user info, whole, as ``***``. Unlike a database's user, it may be the secret
    itself (a NATS token is the user part: ``nats://TOKEN@host``)."""
    shown = []
    for server in nats_servers(url):
        head, info, rest = _user_info(_PASSWORD_PARAMETER.sub(r"\1***", server))
        shown.append(head + ("" if info is None else "***@") + rest)
    return ",".join(shown)


def nats_servers(url: str) -> list[str]:
    """The servers of a NATS target's ``url``: separated by commas, each starting with its
    scheme. A comma not followed by a scheme belongs to the server before it (a password may
    hold one), so a server missing its scheme is refused with the one before it, never taken
    for a host of its own."""
    return [server.strip() for server in _NEXT_SERVER.split(url)]


def without_user_info(url: str) -> tuple[str, str | None]:
    """``url`` without its user info, and the user info (None if it has none)."""
    head, info, rest = _user_info(url)
    return head + rest, info


# A comma that starts another server: the next one's scheme follows it.
_NEXT_SERVER = re.compile(r",(?=\s*[A-Za-z][A-Za-z0-9+.-]*://)")
_PASSWORD_PARAMETER = re.compile(r"([?&]password=)[^&#]*")
# Schemes whose URLs have no '@' but in their user info: a broker's (a NATS URL has no path;
# a Redis one the database number, its query a few options). An '@' anywhere in one of them
# ends its user info, even past a character that ends the authority ('#', '/', '?'), which a
# password may hold. An HTTP or database URL may have one in its path or query.
_AT_ONLY_IN_USER_INFO = frozenset({"redis", "rediss", "nats", "tls"})


def _user_info(url: str) -> tuple[str, str | None, str]:
    """(``scheme://``, the user info or None, the rest after its ``@``). When the URL cannot be
    read as one (a character that ends the authority in a password, no scheme), everything
    before the last ``@`` is taken for the user info: shown, it would be a secret's, in part."""
    scheme, sep, rest = url.partition("://")
    head = scheme + sep if sep else ""
    if not sep:
        rest = url
    at = rest.rfind("@")
    if at < 0:
        return head, None, rest
    if sep and scheme.lower() not in _AT_ONLY_IN_USER_INFO:
        try:
            parts = urlsplit(url)
            _ = parts.port  # raises ValueError for a port that is not a number
        except ValueError:
            parts = None
        if parts is not None and parts.hostname:
            # Read as a URL: its user info ends at the last '@' of its authority, which ends
            # at the first '/', '?' or '#'.
            ends = [found for found in map(rest.find, "/?#") if found >= 0]
            at = rest.rfind("@", 0, min(ends, default=len(rest)))
            if at < 0:
                return head, None, rest
    return head, rest[:at], rest[at + 1 :]


@dataclass(frozen=True, slots=True, kw_only=True)
class TargetConfig:
    name: str
    url: str
    kind: TargetKind = "http"
    # kind = "redis": the stream key each delivery is added to, and its approximate cap.
    stream: str | None = None
    maxlen: int | None = None
    # kind = "nats": the subject each delivery is published on (a JetStream stream captures it).
    subject: str | None = None
    fields: tuple[str, ...] = ()
    waba_ids: tuple[str, ...] = ()
    phone_number_ids: tuple[str, ...] = ()
    # Content filters: a change matches when one of its messages[] has one of these types, or
    # one of its statuses[] one of these statuses (gateway.edge.filters).
    message_types: tuple[str, ...] = ()
    statuses: tuple[str, ...] = ()
    timeout_s: float = 10 * SECONDS
    attempts: int = 12
    wait_initial_s: float = 1 * SECONDS
    wait_max_s: float = 5 * MINUTES
    wait_exp_base: float = 2.0
    max_age_s: float = 7 * DAYS
    # The waits between attempts, the last one repeated; instead of the wait_* keys.
    retry_schedule_s: tuple[float, ...] = ()
    split: Split = "none"
    secret: str | None = None
    signature: Signature = "gateway"
    concurrency: int = 32
    # Requests written ahead of their responses on one connection (gateway.delivery.upstream).
    pipeline: int = 32
    # https:// only. The CA bundle that verifies the target's certificate instead of the
    # system's trust store (a private CA), and a client certificate and key for a target that
    # asks for one (internal mTLS). Read at start and at each reload (gateway.delivery.target_tls).
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    order: Order = "none"
    # Deliveries per second to this target for the whole deployment (None: no limit), and how
    # many may go at once after a quiet spell (None: one second's worth, at least one).
    rate_per_s: float | None = None
    burst: int | None = None

    def __repr__(self) -> str:
        return (
            f"TargetConfig(name={self.name!r}, kind={self.kind!r}, "
            f"url={redact_servers(self.url)!r}, split={self.split!r}, "
            f"signature={self.signature!r})"
        )

    @property
    def burst_size(self) -> int:
        """The bucket's size: ``burst``, else one second's worth of ``rate_per_s``, at least 1."""
        if self.burst is not None:
            return self.burst
        return max(1, math.ceil(self.rate_per_s or 1))


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8081
    token: str | None = None
    # Names the listener answers to besides its own address, `host` and loopback (a DNS name
    # on a private network, a tunnel's name): any other Host is refused (DNS rebinding).
    allowed_hosts: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return (
            f"AdminConfig(enabled={self.enabled}, host={self.host!r}, port={self.port}, "
            f"allowed_hosts={self.allowed_hosts!r})"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class DispatcherConfig:
    # How often the dispatcher looks for due deliveries when nothing wakes it (another process
    # may have written the outbox, a retry may have come due).
    poll_interval_s: float = 0.1 * SECONDS
    batch_size: int = 256


@dataclass(frozen=True, slots=True, kw_only=True)
class TracingConfig:
    """``[tracing]``: OpenTelemetry traces over OTLP/HTTP. A key the file leaves out is taken
    from the standard ``OTEL_*`` variable at load, so the values here are the ones in force."""

    enabled: bool = False
    # The collector's base URL (http://HOST:4318); spans go to its /v1/traces. None: the
    # exporter's own default (or OTEL_EXPORTER_OTLP_*ENDPOINT).
    endpoint: str | None = None
    service_name: str = "waba-gateway"
    # The share of new traces recorded; an attempt follows the decision of its stored trace.
    sample_ratio: float = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    listen: ListenConfig = field(default_factory=ListenConfig)
    tls: TlsConfig
    meta: MetaConfig
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    targets: tuple[TargetConfig, ...] = ()
    admin: AdminConfig = field(default_factory=AdminConfig)
    dispatcher: DispatcherConfig = field(default_factory=DispatcherConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    log_level: str = "info"
    # "text" for a terminal, "json" (one object per line) for a log pipeline.
    log_format: LogFormat = "text"
    # The file this came from, for messages; None when built in code (``serve --dev``, tests).
    source: Path | None = None
