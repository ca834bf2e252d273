"""Configuration: frozen, typed, validated once.

Rule: nothing outside this module reads TOML or the environment for settings. :func:`load_config`
is the one way in; every error it raises names the file, the key path, the value and what was
expected, e.g. ``config/gateway.toml: targets[0].url = 'ftp://x': expected an http:// or https://
URL``. Units live in key names (``timeout_s``, ``max_body_bytes``).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit, urlunsplit

from gateway.errors import ConfigError
from gateway.units import DAYS, MINUTES, SECONDS, MiB

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "META_CLIENT_CN",
    "MIN_ADMIN_TOKEN_CHARS",
    "AdminConfig",
    "Config",
    "DispatcherConfig",
    "ListenConfig",
    "MetaConfig",
    "OutboxConfig",
    "TargetConfig",
    "TlsConfig",
    "TracingConfig",
    "default_config_path",
    "load_admin_config",
    "load_config",
    "redact_servers",
    "redact_url",
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
# The URL schemes each kind takes, and the extra whose driver it needs (None: always installed).
_KIND_SCHEMES: dict[str, tuple[str, ...]] = {
    "http": ("http", "https"),
    "redis": ("redis", "rediss"),
    "nats": ("nats", "tls"),
}
_KIND_EXTRAS: dict[str, tuple[str, str] | None] = {
    "http": None,
    "redis": ("redis", "redis"),  # (extra, the module its driver installs)
    "nats": ("nats", "nats"),
}
# The keys only some kinds take: (required, optional) per kind.
_KIND_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "http": ((), ()),
    "redis": (("stream",), ("maxlen",)),
    "nats": (("subject",), ()),
}


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
    # Every connection starts with a PROXY protocol v2 header from a TCP load balancer (TLS
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
    how messages show a database."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    query = _PASSWORD_PARAMETER.sub(r"\1***", parts.query)
    return urlunsplit(parts._replace(query=query))


_PASSWORD_PARAMETER = re.compile(r"((?:^|&)password=)[^&]*")


def redact_servers(url: str) -> str:
    """:func:`redact_url` for each server of a comma-separated list (NATS takes several)."""
    return ",".join(redact_url(server) for server in url.split(","))


def _is_postgres_url(text: str) -> bool:
    try:
        parts = urlsplit(text)
        _ = parts.port
    except ValueError:
        return False
    return parts.scheme in ("postgresql", "postgres") and not any(c.isspace() for c in text)


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


def default_config_path(env: Mapping[str, str] = os.environ) -> Path:
    """``$WABA_GATEWAY_CONFIG``, else ``config/gateway.toml``."""
    value = env.get("WABA_GATEWAY_CONFIG")
    return Path(value) if value else DEFAULT_CONFIG_PATH


def load_config(path: Path, env: Mapping[str, str] = os.environ) -> Config:
    """Read, expand ``${ENV}``, validate and freeze the TOML file at ``path``.

    Raises :class:`~gateway.errors.ConfigError` for an unreadable file, invalid TOML, an unknown
    table or key, a wrong type, a value out of range or an unset environment variable. It does not
    open the certificate, key, CA or CRL files; building the TLS context does that.
    """
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    return _Reader(path, env).config(data)


def load_admin_config(path: Path, env: Mapping[str, str] = os.environ) -> AdminConfig:
    """Only the ``[admin]`` table of the file at ``path``, validated as :func:`load_config` does.

    This is how ``waba-gateway reload`` finds the running gateway's admin listener when the rest
    of the file would not load (a misspelt key, invalid TOML in another table): the gateway
    itself then reads the whole file, and reports, logs and counts the failed reload. Raises
    :class:`~gateway.errors.ConfigError` when the file cannot be read or ``[admin]`` itself is
    invalid.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        # Invalid elsewhere, perhaps: read the [admin] table's own lines alone.
        try:
            data = tomllib.loads(_admin_lines(text))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML in [admin]: {exc}") from exc
    return _Reader(path, env).section("admin", "admin", data.get("admin", {}), AdminConfig)


_TABLE_HEADER = re.compile(r"^\s*\[")
_ADMIN_HEADER = re.compile(r"^\s*\[\s*admin\s*\]\s*(#.*)?$")


def _admin_lines(text: str) -> str:
    """The ``[admin]`` header and the lines up to the next table's header ('' if none)."""
    lines: list[str] = []
    inside = False
    for line in text.splitlines():
        if _TABLE_HEADER.match(line):
            inside = bool(_ADMIN_HEADER.match(line))
        if inside:
            lines.append(line)
    return "\n".join(lines)


# Below, the dataclasses above are the schema: their fields are the keys, their type hints the
# types, fields without a default the required keys. A key absent from the file is not passed on,
# so each default lives in one place. Every count must be >= 1 and every duration > 0 unless
# _RULES says otherwise.

_T = TypeVar("_T")
_Rule = tuple[Callable[[Any], bool], str]

_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_TABLES = (
    "listen",
    "tls",
    "meta",
    "outbox",
    "targets",
    "admin",
    "dispatcher",
    "log",
    "tracing",
)
# What `[tracing] enabled = true` needs beyond opentelemetry-api: the otel extra.
_TRACING_MODULES = ("opentelemetry.sdk",)
_SECRETS = frozenset(
    {"meta.verify_tokens", "meta.app_secrets", "targets.secret", "admin.token", "outbox.url"}
)
_URLS = frozenset({"targets.url"})
_SCALARS: dict[object, tuple[type | UnionType, str]] = {
    bool: (bool, "true or false"),
    int: (int, "an integer"),
    float: (int | float, "a finite number"),
}
# The exponential backoff's keys, which targets[].retry_schedule_s replaces.
_EXPONENTIAL = ("wait_initial_s", "wait_max_s", "wait_exp_base")
_LogLevel = Literal["debug", "info", "warning", "error"]


_SHA256 = re.compile(r"[0-9A-Fa-f]{64}|[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){31}")


def _is_server_url(text: str, schemes: tuple[str, ...]) -> bool:
    try:
        parts = urlsplit(text)
        _ = parts.port  # raises ValueError for a port that is not a number in 0..65535
    except ValueError:
        return False
    has_space = any(char.isspace() for char in text)
    return parts.scheme in schemes and bool(parts.hostname) and not has_space


def _installed(module: str) -> bool:
    # find_spec, not import: loading a driver is the adapter's business, at its first use.
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        return False


_HOST_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def _is_host_name(text: str) -> bool:
    """A DNS name or an IP address, as a Host header names it, without a port."""
    name = text.lower().removesuffix(".")
    try:
        ipaddress.ip_address(name.removeprefix("[").removesuffix("]"))
        return True
    except ValueError:
        pass
    return 0 < len(name) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in name.split("."))


def _is_loopback(host: str) -> bool:
    try:
        return host.lower() == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_DEFAULT_RULES: dict[object, _Rule] = {
    int: (lambda value: value >= 1, "an integer >= 1"),
    float: (lambda value: value > 0, "a number > 0"),
}
_NON_EMPTY: _Rule = (bool, "a non-empty list of strings")
_RULES: dict[str, _Rule] = {
    "listen.port": (lambda value: 1 <= value <= 65535, "an integer from 1 to 65535"),
    "listen.path": (lambda value: value.startswith("/"), "a path starting with '/'"),
    "tls.client_cn": _NON_EMPTY,
    "tls.session_tickets": (lambda value: 0 <= value <= 8, "an integer from 0 to 8"),
    "tls.meta_ca_sha256": (
        lambda value: all(_SHA256.fullmatch(each) for each in value),
        "SHA-256 fingerprints, 64 hex digits each (colons between pairs allowed)",
    ),
    "meta.verify_tokens": _NON_EMPTY,
    "meta.app_secrets": _NON_EMPTY,
    "outbox.url": (_is_postgres_url, "a postgresql:// URL"),
    "tracing.endpoint": (
        lambda value: _is_server_url(value, ("http", "https")),
        "an http:// or https:// URL",
    ),
    "tracing.sample_ratio": (lambda value: 0 <= value <= 1, "a number from 0 to 1"),
    "targets.wait_initial_s": (lambda value: value >= 0, "a number >= 0"),
    "targets.wait_exp_base": (lambda value: value >= 1, "a number >= 1"),
    "targets.retry_schedule_s": (
        lambda value: bool(value) and all(wait >= 0 for wait in value),
        "a non-empty list of numbers >= 0",
    ),
    # 0 asks the OS for a free port, which tests use.
    "admin.port": (lambda value: 0 <= value <= 65535, "an integer from 0 to 65535"),
    "admin.allowed_hosts": (
        lambda value: all(_is_host_name(each) for each in value),
        "a list of host names or IP addresses, without scheme or port",
    ),
}


def _shown(value: object, secret: bool) -> str:
    """The value as a message shows it, spelt as in TOML where Python spells it otherwise
    (``true``, not ``True``); a secret only as its unexpanded ``${NAME}`` text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if not secret or value in ("", []) or (isinstance(value, str) and "${" in value):
        return repr(value)
    return "<hidden>"


# A misspelt key whose name has one of these in it, or is close to a secret key's name, may
# hold a secret: its value is hidden. Any other misspelt key's value is shown, to find it by.
_SECRET_WORDS = ("secret", "token", "pass", "key", "auth", "credential", "url")
_SECRET_NAMES = sorted({name.rpartition(".")[2] for name in _SECRETS})


def _may_be_secret(key: str, value: object) -> bool:
    """Whether the value of the unknown key ``key`` may be a secret (a table may hold one)."""
    lowered = key.lower()
    return (
        isinstance(value, dict)
        or any(word in lowered for word in _SECRET_WORDS)
        or bool(difflib.get_close_matches(lowered, _SECRET_NAMES))
    )


def _join(table: str, key: str) -> str:
    return f"{table}.{key}" if table else key


class _Reader:
    def __init__(self, source: Path, env: Mapping[str, str]) -> None:
        self.source = source
        self.env = env

    def error(self, key: str, value: object, expected: str, *, secret: bool = False) -> ConfigError:
        return ConfigError(f"{self.source}: {key} = {_shown(value, secret)}: expected {expected}")

    def config(self, data: dict[str, Any]) -> Config:
        self.check_keys("", data, _TABLES)

        def table(name: str, cls: type[_T]) -> _T:
            return self.section(name, name, data.get(name, {}), cls)

        tls = table("tls", TlsConfig)
        if tls.client_auth != "off" and tls.client_ca_file is None:
            # With no CA to check against, client certificates would prove nothing.
            expected = "'off' unless tls.client_ca_file is set"
            raise self.error("tls.client_auth", tls.client_auth, expected)
        meta = table("meta", MetaConfig)
        admin = table("admin", AdminConfig)
        if admin.enabled and not _is_loopback(admin.host):
            # The admin API replays and drops deliveries: only this host, or a token holder,
            # and a token others on the network cannot guess.
            if admin.token is None:
                expected = "a loopback address unless admin.token is set"
                raise self.error("admin.host", admin.host, expected)
            if len(admin.token) < MIN_ADMIN_TOKEN_CHARS:
                expected = (
                    f"at least {MIN_ADMIN_TOKEN_CHARS} characters when admin.host is not "
                    f"loopback (admin.host = {admin.host!r}); make one with: openssl rand -hex 32"
                )
                raise self.error("admin.token", admin.token, expected, secret=True)
        hints = {"level": _LogLevel, "format": LogFormat}
        log = self.table("log", "log", data.get("log", {}), hints, ())
        listen = table("listen", ListenConfig)
        if listen.loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
            expected = "'asyncio', or uvloop installed (pip install 'waba-gateway[speed]')"
            raise self.error("listen.loop", listen.loop, expected)
        return Config(
            listen=listen,
            tls=tls,
            meta=meta,
            outbox=self.outbox(data.get("outbox", {})),
            targets=self.targets(data.get("targets", [])),
            admin=admin,
            dispatcher=table("dispatcher", DispatcherConfig),
            tracing=self.tracing(data.get("tracing", {})),
            source=self.source,
            **{f"log_{key}": value for key, value in log.items()},
        )

    def tracing(self, value: object) -> TracingConfig:
        """``[tracing]``, each key the file leaves out taken from its OTEL_* variable."""
        given = self.check_keys("tracing", value, get_type_hints(TracingConfig))
        defaults: dict[str, Any] = {}
        if "service_name" not in given and self.env.get("OTEL_SERVICE_NAME"):
            defaults["service_name"] = self.env["OTEL_SERVICE_NAME"]
        ratio = self.env.get("OTEL_TRACES_SAMPLER_ARG")
        if "sample_ratio" not in given and ratio:
            try:
                defaults["sample_ratio"] = float(ratio)
            except ValueError:
                raise ConfigError(
                    f"{self.source}: tracing.sample_ratio is not set and OTEL_TRACES_SAMPLER_ARG"
                    f" = {ratio!r} is not a number from 0 to 1"
                ) from None
            if not 0 <= defaults["sample_ratio"] <= 1:
                raise ConfigError(
                    f"{self.source}: tracing.sample_ratio is not set and OTEL_TRACES_SAMPLER_ARG"
                    f" = {ratio!r} is not a number from 0 to 1"
                )
        hints = get_type_hints(TracingConfig)
        tracing = TracingConfig(**(defaults | self.table("tracing", "tracing", value, hints, ())))
        if tracing.enabled and not all(_installed(module) for module in _TRACING_MODULES):
            expected = "false, or the otel extra installed (pip install 'waba-gateway[otel]')"
            raise self.error("tracing.enabled", True, expected)
        return tracing

    def outbox(self, value: object) -> OutboxConfig:
        outbox = self.section("outbox", "outbox", value, OutboxConfig)
        if outbox.url is not None and isinstance(value, dict) and "path" in value:
            # One outbox: a file on this host, or a database; both would be a guess.
            raise ConfigError(
                f"{self.source}: outbox.path and outbox.url are both set: keep outbox.path for"
                " the SQLite file on this host, or outbox.url for PostgreSQL, not both"
            )
        return outbox

    def targets(self, value: object) -> tuple[TargetConfig, ...]:
        if not isinstance(value, list):
            raise self.error("targets", value, "an array of tables ([[targets]])", secret=True)
        targets: list[TargetConfig] = []
        for index, item in enumerate(value):
            key = f"targets[{index}]"
            target = self.section(key, "targets", item, TargetConfig)
            # Names key the outbox rows and the admin API, so two targets cannot share one.
            names = [other.name for other in targets]
            if target.name in names:
                used = f"{target.name!r} is already used by targets[{names.index(target.name)}]"
                raise self.error(f"{key}.name", target.name, f"a unique name, {used}")
            if target.signature == "meta" and target.secret is None:
                # Signed as Meta signs, the body is checked with the secret a consumer holds
                # for this target: there is no key without one (the app secret never leaves).
                expected = f"'gateway' unless {key}.secret is set"
                raise self.error(f"{key}.signature", target.signature, expected)
            self.target_tls(key, target)
            self.check_kind(key, target, item)
            if target.wait_max_s < target.wait_initial_s:
                # Blame the key the file set: the other one may be a default.
                raw = item if isinstance(item, dict) else {}
                if "wait_max_s" in raw:
                    expected = f"a number >= {key}.wait_initial_s ({target.wait_initial_s:g})"
                    raise self.error(f"{key}.wait_max_s", raw["wait_max_s"], expected)
                expected = f"a number <= {key}.wait_max_s ({target.wait_max_s:g})"
                raise self.error(f"{key}.wait_initial_s", raw.get("wait_initial_s"), expected)
            waits = [name for name in _EXPONENTIAL if isinstance(item, dict) and name in item]
            if target.retry_schedule_s and waits:
                # Two schedules for one target: which one was meant is a guess.
                raise ConfigError(
                    f"{self.source}: {key}.retry_schedule_s and {key}.{waits[0]} are both set:"
                    " keep retry_schedule_s for explicit waits, or the wait_* keys for"
                    " exponential backoff, not both"
                )
            targets.append(target)
        return tuple(targets)

    def target_tls(self, key: str, target: TargetConfig) -> None:
        files = {"ca_file": target.ca_file, "cert_file": target.cert_file}
        files["key_file"] = target.key_file
        for name, path in files.items():
            if path is not None and not target.url.startswith("https://"):
                # A file that would never be used is a mistake the operator should hear of.
                expected = f"no TLS file for an http:// target ({key}.url = {target.url!r})"
                raise self.error(f"{key}.{name}", str(path), expected)
        if (target.cert_file is None) != (target.key_file is None):
            given, missing = ("cert_file", "key_file")[:: 1 if target.key_file is None else -1]
            raise ConfigError(
                f"{self.source}: {key}.{given} is set without {key}.{missing}: a client"
                " certificate needs both"
            )

    def check_kind(self, key: str, target: TargetConfig, raw: object) -> None:
        """The keys of ``target``'s kind are set, those of other kinds are not, its URL has a
        scheme of that kind, and the extra with its driver is installed."""
        kind = target.kind
        url = redact_servers(target.url)
        schemes = _KIND_SCHEMES[kind]
        # NATS clients take several servers, separated by commas; the others one.
        servers = target.url.split(",") if kind == "nats" else [target.url]
        if not all(_is_server_url(server.strip(), schemes) for server in servers):
            article = "an" if kind == "http" else "a"  # "an http://", "a redis://"
            expected = f"{article} " + " or ".join(f"{scheme}://" for scheme in schemes) + " URL"
            if kind == "nats":
                expected += " (several separated by commas)"
            if kind != "http":
                expected += f" with kind = {kind!r}"
            # As written when it has ${NAME} references: they may hold a broker's password.
            written = raw.get("url") if isinstance(raw, dict) else None
            shown = written if isinstance(written, str) and "${" in written else url
            raise self.error(f"{key}.url", shown, expected)
        required, optional = _KIND_KEYS[kind]
        for each in required:
            if getattr(target, each) is None:
                raise ConfigError(
                    f"{self.source}: {key}.{each}: required key is missing with kind = {kind!r}"
                )
        for each in ("stream", "maxlen", "subject"):
            value = getattr(target, each)
            if each not in required + optional and value is not None:
                raise self.error(f"{key}.{each}", value, f"no {each} with kind = {kind!r}")
        extra = _KIND_EXTRAS[kind]
        if extra is not None and not _installed(extra[1]):
            raise ConfigError(
                f"{self.source}: {key}.kind = {kind!r} needs the {extra[0]!r} extra, which is not"
                f" installed: pip install 'waba-gateway[{extra[0]}]'"
            )

    def section(self, key: str, name: str, value: object, cls: type[_T]) -> _T:
        """Table ``key`` (``name`` without its index) as a ``cls``."""
        required = [
            each.name
            # _T is always one of the dataclasses above; mypy cannot know that.
            for each in dataclasses.fields(cls)  # type: ignore[arg-type]
            if each.default is dataclasses.MISSING and each.default_factory is dataclasses.MISSING
        ]
        return cls(**self.table(key, name, value, get_type_hints(cls), required))

    def table(
        self,
        key: str,
        name: str,
        value: object,
        hints: Mapping[str, Any],
        required: Iterable[str],
    ) -> dict[str, Any]:
        """The converted values of the keys present in table ``key``."""
        table = self.check_keys(key, value, hints)
        for each in required:
            if each not in table:
                raise ConfigError(f"{self.source}: {_join(key, each)}: required key is missing")
        return {
            each: self.convert(_join(key, each), f"{name}.{each}", hints[each], item)
            for each, item in table.items()
        }

    def check_keys(self, key: str, value: object, known: Iterable[str]) -> dict[str, object]:
        if not isinstance(value, dict):
            raise self.error(key, value, "a table", secret=True)
        for each, item in value.items():
            if each not in known:
                expected = "one of the keys " + ", ".join(sorted(known))
                raise self.error(
                    _join(key, each), item, expected, secret=_may_be_secret(each, item)
                )
        return value

    def convert(self, key: str, name: str, hint: Any, value: object) -> Any:
        """``value`` as type ``hint``, checked against the rule for ``name``."""
        secret = name in _SECRETS
        if get_origin(hint) is UnionType:  # `X | None`: None is only ever the default
            hint = get_args(hint)[0]
        result: Any
        if hint in _SCALARS:
            kind, expected = _SCALARS[hint]
            # TOML's true is not 1, although Python's bool is an int; an integer is a fine float.
            if (
                not isinstance(value, int | float)
                or not isinstance(value, kind)
                or isinstance(value, bool) != (hint is bool)
                or not math.isfinite(value)
            ):
                raise self.error(key, value, expected, secret=secret)
            result = float(value) if hint is float else value
        elif hint == tuple[float, ...]:
            if not isinstance(value, list) or not all(
                isinstance(item, int | float) and not isinstance(item, bool) and math.isfinite(item)
                for item in value
            ):
                raise self.error(key, value, "a list of numbers", secret=secret)
            result = tuple(float(item) for item in value)
        elif get_origin(hint) is tuple:
            if not isinstance(value, list):
                raise self.error(key, value, "a list of strings", secret=secret)
            result = tuple(self.text(f"{key}[{i}]", item, secret) for i, item in enumerate(value))
        else:
            result = self.text(key, value, secret)
            if get_origin(hint) is Literal and result not in get_args(hint):
                raise self.error(key, result, "one of " + ", ".join(map(repr, get_args(hint))))
            if hint is Path:
                # Relative to the config file, so a config works whatever the working directory.
                result = self.source.parent / result
        valid, expected = _RULES.get(name) or _DEFAULT_RULES.get(hint, (lambda _: True, ""))
        if not valid(result):
            # The expanded text, or the number as written (`0`, not `0.0`); a URL without
            # its password (a target's URL may carry one).
            shown = result if isinstance(result, str) and not secret else value
            if name in _URLS and isinstance(shown, str):
                shown = redact_url(shown)
            raise self.error(key, shown, expected, secret=secret)
        return result

    def text(self, key: str, value: object, secret: bool) -> str:
        """A non-empty string with its ``${NAME}`` references replaced from the environment."""
        if not isinstance(value, str):
            raise self.error(key, value, "a string", secret=secret)
        if "${" in _REFERENCE.sub("", value):
            # A malformed reference is a typo, not text to pass on verbatim.
            expected = "${NAME} references, NAME made of letters, digits and '_'"
            raise self.error(key, value, expected, secret=secret)
        for env_name in _REFERENCE.findall(value):
            if env_name not in self.env:
                raise ConfigError(
                    f"{self.source}: {key} = {_shown(value, secret)}: "
                    f"environment variable {env_name} is not set"
                )
        # One pass: text that comes from the environment is never expanded again.
        text = _REFERENCE.sub(lambda match: self.env[match[1]], value)
        if not text:
            raise self.error(key, value, "a non-empty string", secret=secret)
        return text
