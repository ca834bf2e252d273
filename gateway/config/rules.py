"""What each key's value must be, beyond its type: ports in range, URLs of the right scheme,
host names, fingerprints; and which keys hold secrets.

Rule: pure predicates and tables, keyed by the key's name without its index
(``targets.url``); :class:`.reader.Reader` applies them and words the error. A count must be
>= 1 and a duration > 0 unless :data:`RULES` says otherwise.
"""

from __future__ import annotations

import importlib.util
import inspect
import ipaddress
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "DATABASE_URLS",
    "DEFAULT_RULES",
    "KIND_EXTRAS",
    "KIND_KEYS",
    "KIND_SCHEMES",
    "REDIS_SENDER_OPTIONS",
    "RULES",
    "SECRETS",
    "URLS",
    "Rule",
    "admin_exposure",
    "host_name_problem",
    "installed",
    "is_loopback",
    "is_nats_subject",
    "is_server_url",
    "redis_url_refusal",
]

Rule = tuple[Callable[[Any], bool], str]

# The URL schemes each kind takes, and the extra whose driver it needs (None: always installed).
KIND_SCHEMES: dict[str, tuple[str, ...]] = {
    "http": ("http", "https"),
    "redis": ("redis", "rediss"),
    "nats": ("nats", "tls"),
}
KIND_EXTRAS: dict[str, tuple[str, str] | None] = {
    "http": None,
    "redis": ("redis", "redis"),  # (extra, the module its driver installs)
    "nats": ("nats", "nats"),
}
# The keys only some kinds take: (required, optional) per kind.
KIND_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "http": ((), ()),
    "redis": (("stream",), ("maxlen",)),
    "nats": (("subject",), ()),
}
SECRETS = frozenset(
    {"meta.verify_tokens", "meta.app_secrets", "targets.secret", "admin.token", "outbox.url"}
)
# URLs whose user info may be a secret: shown without it, and so is a database URL's password.
URLS = frozenset({"targets.url", "tracing.endpoint"})
DATABASE_URLS = frozenset({"outbox.url"})

# The connection options the Redis sender sets itself (gateway.delivery.redis_stream), and
# why. redis-py lets a URL's query override what its caller passes, so any of them in a
# target's URL would silently replace the sender's: refused, naming the option.
REDIS_SENDER_OPTIONS: dict[str, str] = {
    "decode_responses": "it reads Redis's replies as bytes",
    "protocol": "it speaks RESP2, where a batch's replies are exactly the next ones read",
    "socket_connect_timeout": "from the target's timeout_s",
    "socket_timeout": "the target's timeout_s bounds each exchange instead",
}

_SHA256 = re.compile(r"[0-9A-Fa-f]{64}|[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){31}")


def is_server_url(text: str, schemes: tuple[str, ...]) -> bool:
    try:
        parts = urlsplit(text)
        _ = parts.port  # raises ValueError for a port that is not a number in 0..65535
    except ValueError:
        return False
    has_space = any(char.isspace() for char in text)
    return (
        parts.scheme in schemes
        and bool(parts.hostname)
        and not has_space
        and host_name_problem(parts.hostname or "") is None
    )


def host_name_problem(host: str) -> str | None:
    """Why the resolver cannot look ``host`` up, or ``None`` when it can.

    The resolver IDNA-encodes the name first, and DNS labels are 1 to 63 characters
    (RFC 1035 section 2.3.4): a typo such as ``gw..example.com`` makes that encoding fail with a
    UnicodeError deep inside every connection, so it is caught when the URL is read instead.
    """
    try:
        host.encode("idna")
    except UnicodeError as exc:
        reason = str(exc.__cause__ or exc)
        return (
            f"host name {host!r} cannot be looked up ({reason}): every label between dots must "
            "have 1 to 63 characters"
        )
    return None


def is_nats_subject(text: str) -> bool:
    """A subject a message can be published to: tokens separated by '.', none of them empty,
    without white space (the protocol's separator: the server drops the connection) or the
    wildcards '*' and '>' (a subscription's, never a message's)."""
    return all(
        token and not any(char.isspace() or char in "*>" for char in token)
        for token in text.split(".")
    )


def redis_url_refusal(url: str) -> str | None:
    """Why redis-py would refuse the options in the query of ``url`` (a redis:// or rediss://
    URL), or None: read as the sender's driver reads it, by its own parse_url, each option a
    keyword of its connection pool or of the connection class the scheme takes. redis-py
    passes on what it does not know, and the connection refuses it at each connect: checked
    here, the error is one line at load rather than a failure of every batch. An option of
    :data:`REDIS_SENDER_OPTIONS` is refused too: redis-py would take it, over the sender's."""
    if not urlsplit(url).query:
        return None  # only the query holds options; the rest was checked as a server URL
    # Imported only here, for a Redis target with options: the driver is the adapter's to load.
    from redis.asyncio.connection import (
        Connection,
        ConnectionPool,
        SSLConnection,
        parse_url,
    )

    try:
        options: dict[str, object] = dict(parse_url(url))
    except (TypeError, ValueError) as exc:
        reason = str(exc).rstrip(".")  # "Invalid value for 'db' in connection URL."
        return reason[:1].lower() + reason[1:]
    connection = options.pop("connection_class", Connection)
    assert isinstance(connection, type)
    unknown = sorted(set(options) - _keywords(ConnectionPool) - _keywords(connection))
    if unknown:
        if all(name in _keywords(SSLConnection) for name in unknown):
            return f"{unknown[0]!r} is an option of rediss:// (TLS) URLs only"
        return f"{unknown[0]!r} is not an option redis-py takes"
    owned = sorted(set(options) & REDIS_SENDER_OPTIONS.keys())
    if owned:
        return f"{owned[0]!r} is set by the gateway itself: {REDIS_SENDER_OPTIONS[owned[0]]}"
    return None


def _keywords(cls: type) -> set[str]:
    """The keyword arguments ``cls(...)`` takes: its own, and each base's that it passes
    ``**kwargs`` on to."""
    names: set[str] = set()
    for each in cls.__mro__:
        init = each.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters.values()
        names.update(
            p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        )
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return names - {"self", "connection_class"}


def installed(module: str) -> bool:
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


def admin_exposure(
    enabled: bool, host: str, token: str | None, min_chars: int
) -> tuple[str, str] | None:
    """What is wrong with an admin listener on ``host`` protected by ``token``, as (the key to
    name, what it must be), or None. The admin API replays and drops deliveries: only this
    host, or a holder of a token others on the network cannot guess. Checked when a file is
    loaded, and again on what a reload would put in force (its listener stays where it was)."""
    if not enabled or is_loopback(host):
        return None
    if token is None:
        return "admin.host", "a loopback address unless admin.token is set"
    if len(token) < min_chars:
        return "admin.token", (
            f"at least {min_chars} characters when admin.host is not loopback"
            f" (admin.host = {host!r}); make one with: openssl rand -hex 32"
        )
    return None


def is_loopback(host: str) -> bool:
    try:
        return host.lower() == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_postgres_url(text: str) -> bool:
    try:
        parts = urlsplit(text)
        _ = parts.port
    except ValueError:
        return False
    return parts.scheme in ("postgresql", "postgres") and not any(c.isspace() for c in text)


DEFAULT_RULES: dict[object, Rule] = {
    int: (lambda value: value >= 1, "an integer >= 1"),
    float: (lambda value: value > 0, "a number > 0"),
}
_NON_EMPTY: Rule = (bool, "a non-empty list of strings")
RULES: dict[str, Rule] = {
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
        lambda value: is_server_url(value, ("http", "https")),
        "an http:// or https:// URL",
    ),
    "tracing.sample_ratio": (lambda value: 0 <= value <= 1, "a number from 0 to 1"),
    "targets.subject": (
        is_nats_subject,
        "a NATS subject to publish to: tokens separated by '.', none empty, without white"
        " space or the wildcards '*' and '>'",
    ),
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
