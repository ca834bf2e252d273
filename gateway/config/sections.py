"""The configuration's tables one by one, and the rules between their keys: a client CA
for client certificates, a token for an admin listener beyond loopback, unique target names, each
target kind's own keys and extra, one set of credentials for a NATS target's servers, and only
options its driver takes in a Redis target's URL.

Rule: each check raises a :class:`~gateway.errors.ConfigError` naming the file and the key at
fault (the one the file set, where two keys disagree).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, get_type_hints
from urllib.parse import unquote

from gateway.config.model import (
    MIN_ADMIN_TOKEN_CHARS,
    AdminConfig,
    Config,
    DispatcherConfig,
    ListenConfig,
    LogFormat,
    MetaConfig,
    OutboxConfig,
    TargetConfig,
    TlsConfig,
    TracingConfig,
    nats_servers,
    redact_servers,
    without_user_info,
)
from gateway.config.reader import Reader, as_written
from gateway.config.rules import (
    KIND_EXTRAS,
    KIND_KEYS,
    KIND_SCHEMES,
    admin_exposure,
    installed,
    is_server_url,
    redis_url_refusal,
)
from gateway.config.sampling import SamplerUnknown, sample_ratio
from gateway.errors import ConfigError

__all__ = ["ConfigReader"]

_T = TypeVar("_T")
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
# The exponential backoff's keys, which targets[].retry_schedule_s replaces.
_EXPONENTIAL = ("wait_initial_s", "wait_max_s", "wait_exp_base")
_LogLevel = Literal["debug", "info", "warning", "error"]


def _otel_service_name(env: Mapping[str, str]) -> str | None:
    """The service name the OpenTelemetry variables give, in the order the SDK configuration
    spec reads them: ``OTEL_SERVICE_NAME``, else ``service.name`` in ``OTEL_RESOURCE_ATTRIBUTES``
    (comma-separated ``key=value``, values percent-encoded); blank or white space is none."""
    name = env.get("OTEL_SERVICE_NAME", "").strip()
    if name:
        return name
    for pair in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, value = pair.partition("=")
        if sep and key.strip() == "service.name":
            value = unquote(value.strip()).strip()
            if value:
                return value
    return None


class ConfigReader(Reader):
    """The whole file: every table, and the rules between their keys."""

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
        exposed = admin_exposure(admin.enabled, admin.host, admin.token, MIN_ADMIN_TOKEN_CHARS)
        if exposed is not None:
            key, expected = exposed
            if key == "admin.host":
                raise self.error(key, admin.host, expected)
            raise self.error(key, admin.token, expected, secret=True)
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
        if "service_name" not in given:
            named = _otel_service_name(self.env)
            if named is not None:
                defaults["service_name"] = named
        if "sample_ratio" not in given:
            sampler = self.env.get("OTEL_TRACES_SAMPLER")
            argument = self.env.get("OTEL_TRACES_SAMPLER_ARG")
            try:
                defaults["sample_ratio"] = sample_ratio(sampler, argument)
            except SamplerUnknown as exc:
                raise ConfigError(
                    f"{self.source}: tracing.sample_ratio is not set and {exc}"
                ) from None
        hints = get_type_hints(TracingConfig)
        tracing = TracingConfig(**(defaults | self.table("tracing", "tracing", value, hints, ())))
        if tracing.enabled and not all(installed(module) for module in _TRACING_MODULES):
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
        from urllib.parse import parse_qs, urlsplit

        files = {"ca_file": target.ca_file, "cert_file": target.cert_file}
        files["key_file"] = target.key_file
        # The schemes that always speak TLS, whatever the kind (check_kind then holds each
        # kind to its own). Every server of a NATS target must be tls://: nats-py speaks TLS
        # to a nats:// server only if that server asks for it, while the sender refuses a
        # tls:// server that does not (gateway.delivery.nats_jetstream).
        servers = nats_servers(target.url) if target.kind == "nats" else [target.url]
        plain = [
            each for each in servers if not each.startswith(("https://", "rediss://", "tls://"))
        ]
        for name, path in files.items():
            if path is not None and plain:
                # A file that would never be used is a mistake the operator should hear of.
                # The URL as shown anywhere else: without the user info it may carry.
                shown = redact_servers(target.url)
                scheme, sep, _ = plain[0].partition("://")
                if sep and scheme.isalnum():
                    article = "an" if scheme == "http" else "a"  # "an http://", "a tls://"
                    # Some servers of several: the others are tls://.
                    what = f"{article} {scheme}:// " + ("target" if plain == servers else "server")
                else:
                    what = "a target whose URL is not https://, rediss:// or tls://"
                expected = f"no TLS file for {what} ({key}.url = {shown!r})"
                raise self.error(f"{key}.{name}", str(path), expected)
        first = next((name for name, path in files.items() if path is not None), None)
        if first is not None and target.kind == "redis":
            # redis-py's own TLS options in the URL build a context of their own, which the
            # one from these files replaces: a setting that is silently ignored is refused.
            options = sorted(
                name for name in parse_qs(urlsplit(target.url).query) if name.startswith("ssl")
            )
            if options:
                expected = (
                    f"no {options[0]} option with {key}.{first} set: a target's ca_file,"
                    " cert_file and key_file make its TLS, and the URL's option would be ignored"
                )
                raise self.error(f"{key}.url", redact_servers(target.url), expected)
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
        schemes = KIND_SCHEMES[kind]
        # NATS clients take several servers, separated by commas; the others one.
        servers = nats_servers(target.url) if kind == "nats" else [target.url]
        if not all(is_server_url(server, schemes) for server in servers):
            article = "an" if kind == "http" else "a"  # "an http://", "a redis://"
            expected = f"{article} " + " or ".join(f"{scheme}://" for scheme in schemes) + " URL"
            if kind == "nats":
                expected += " (several separated by commas)"
            if kind != "http":
                expected += f" with kind = {kind!r}"
            # As written when it has ${NAME} references: they may hold a broker's password.
            written = raw.get("url") if isinstance(raw, dict) else None
            shown = as_written(written) if isinstance(written, str) and "${" in written else url
            raise self.error(f"{key}.url", shown, expected)
        required, optional = KIND_KEYS[kind]
        for each in required:
            if getattr(target, each) is None:
                raise ConfigError(
                    f"{self.source}: {key}.{each}: required key is missing with kind = {kind!r}"
                )
        for each in ("stream", "maxlen", "subject"):
            value = getattr(target, each)
            if each not in required + optional and value is not None:
                raise self.error(f"{key}.{each}", value, f"no {each} with kind = {kind!r}")
        extra = KIND_EXTRAS[kind]
        if extra is not None and not installed(extra[1]):
            raise ConfigError(
                f"{self.source}: {key}.kind = {kind!r} needs the {extra[0]!r} extra, which is not"
                f" installed: pip install 'waba-gateway[{extra[0]}]'"
            )
        if kind == "nats":
            # The gateway sends one set of credentials to whichever server it connects to
            # (nats-py alone would send each server's own, none to a server written without).
            given = {info for _, info in map(without_user_info, servers) if info}
            if len(given) > 1:
                raise ConfigError(
                    f"{self.source}: {key}.url: its servers carry different credentials: write"
                    " them once, on one server, and the gateway uses them for every server"
                )
        if kind == "redis":
            refusal = redis_url_refusal(target.url)
            if refusal is not None:
                expected = f"a redis:// or rediss:// URL whose options redis-py takes: {refusal}"
                raise self.error(f"{key}.url", url, expected)
