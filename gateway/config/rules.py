"""What each key's value must be, beyond its type: ports in range, URLs of the right scheme,
host names, fingerprints; and which keys hold secrets.

Rule: pure predicates and tables, keyed by the key's name without its index
(``targets.url``); :class:`.reader.Reader` applies them and words the error. A count must be
>= 1 unless :data:`RULES` says otherwise; every number key (a duration, a rate) has its range
there.
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
    "FEWEST_PER_S",
    "KIND_EXTRAS",
    "KIND_KEYS",
    "KIND_SCHEMES",
    "LONGEST_BUSY_TIMEOUT_S",
    "LONGEST_S",
    "MOST_PER_S",
    "MOST_WAIT_EXP_BASE",
    "REDIS_SENDER_OPTIONS",
    "RULES",
    "SECRETS",
    "SHORTEST_TIMER_S",
    "URLS",
    "Rule",
    "admin_exposure",
    "host_name_problem",
    "installed",
    "is_loopback",
    "is_nats_subject",
    "is_server_url",
    "is_target_name",
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


def is_target_name(text: str) -> bool:
    """A target's name, as every place that shows or addresses one can carry it: the admin
    API's and console's paths and queries, metric labels, JSON logs and the console's pages.

    - Printable (:meth:`str.isprintable`): a control character breaks a log line or fakes
      another, and a format character such as U+202E reorders it on screen. What it refuses is
      also what ``repr()`` escapes, so every message shows the name as it is.
    - No white space at either end: ``a`` and ``a `` would be two targets that look like one.
    - No ``/``: the console's paths carry the name as one segment (``/console/targets/NAME/
      replay-dead``), and a proxy in front of the admin listener may decode ``%2F`` into a
      separator.
    - No ``{`` or ``}``: aiohttp matches such a segment with ``[^{}/]+``, so a name with a brace
      has no path that reaches it.
    - Not ``.`` or ``..``: a browser removes them as dot-segments (RFC 3986 section 5.2.4)
      before the request leaves it.
    """
    return (
        text.isprintable()
        and text == text.strip()
        and not any(char in "/{}" for char in text)
        and text not in (".", "..")
    )


# The range of a duration (a key ending in _s), in seconds. The longest, 1e9 s (about 31.7
# years), is longer than any wait means anything (a Retry-After is read as at most as long, in
# gateway.delivery.backoff), and below the first value something downstream refuses: a Redis
# target's timeout_s becomes its sockets' timeout, and socket.settimeout() raises OverflowError
# past about 9.2e9 s (nanoseconds in 64 bits).
LONGEST_S = 1e9
# The shortest timeout, interval or lease, 10 ms. uvloop's timers count whole milliseconds and
# round a delay under half of one to none, and a timer of 0 ms fires at every turn of the loop:
# a poll, a file check or a sweep that keeps a CPU busy for ever. Some of these keys are divided
# first (a lease renewed every lease_s / 3, connections swept every quarter of the shorter
# listener timeout); 10 ms keeps each such timer at 2.5 ms or more. SQLite's busy timeout, in
# whole milliseconds too, would be none below 1 ms. A span only compared with time stamps (a
# window, a retention, an age) is never waited for: any positive one works.
SHORTEST_TIMER_S = 0.01
# sqlite3 hands SQLite its busy timeout in milliseconds, as a C int: one millisecond more and
# the connection is left with no busy timeout at all, and a locked file fails at once.
LONGEST_BUSY_TIMEOUT_S = (2**31 - 1) / 1000
# Deliveries per second. At most 1e9: the PostgreSQL outbox refills a target's bucket by the
# seconds elapsed times the rate, in float8, where PostgreSQL raises "value out of range:
# overflow" rather than reach infinity (a rate of 1e308 failed every claim). No target takes a
# billion a second; no limit at all is the key left out. At least one delivery per LONGEST_S.
MOST_PER_S = 1e9
FEWEST_PER_S = 1 / LONGEST_S
# The backoff raises the base to the 64th power at most (gateway.delivery.backoff), and a float
# power past 1.8e308 raises OverflowError, as 65536.0 ** 64 does; 1000 ** 64 is 1e192. A base of
# 1000 already makes each wait a thousand times the one before.
MOST_WAIT_EXP_BASE = 1000.0


def _within(low: float, high: float, expected: str) -> Rule:
    return (lambda value: low <= value <= high, expected)


_TIMER = _within(SHORTEST_TIMER_S, LONGEST_S, "a number from 0.01 to 1e9 (10 ms to about 31 years)")
_SPAN: Rule = (
    lambda value: 0 < value <= LONGEST_S,
    "a number > 0 and at most 1e9 (about 31 years)",
)
_WAIT = _within(0, LONGEST_S, "a number from 0 to 1e9 (about 31 years)")

DEFAULT_RULES: dict[object, Rule] = {
    int: (lambda value: value >= 1, "an integer >= 1"),
    float: (lambda value: value > 0, "a number > 0"),
}
_NON_EMPTY: Rule = (bool, "a non-empty list of strings")
RULES: dict[str, Rule] = {
    "listen.port": (lambda value: 1 <= value <= 65535, "an integer from 1 to 65535"),
    "listen.path": (lambda value: value.startswith("/"), "a path starting with '/'"),
    "listen.idle_timeout_s": _TIMER,
    "listen.request_timeout_s": _TIMER,
    "tls.client_cn": _NON_EMPTY,
    "tls.session_tickets": (lambda value: 0 <= value <= 8, "an integer from 0 to 8"),
    "tls.meta_ca_sha256": (
        lambda value: all(_SHA256.fullmatch(each) for each in value),
        "SHA-256 fingerprints, 64 hex digits each (colons between pairs allowed)",
    ),
    "tls.watch_interval_s": _TIMER,
    "meta.verify_tokens": _NON_EMPTY,
    "meta.app_secrets": _NON_EMPTY,
    "outbox.url": (_is_postgres_url, "a postgresql:// URL"),
    "outbox.lease_s": _TIMER,
    "outbox.dedup_window_s": _SPAN,
    "outbox.retention_s": _SPAN,
    "outbox.dead_retention_s": _SPAN,
    "outbox.busy_timeout_s": _within(
        SHORTEST_TIMER_S,
        LONGEST_BUSY_TIMEOUT_S,
        "a number from 0.01 to 2147483.647 (SQLite's longest busy timeout, about 24.8 days)",
    ),
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
    "targets.name": (
        is_target_name,
        "a name of printable characters other than '/', '{' and '}', without white space at"
        " either end, and not '.' or '..'",
    ),
    "targets.timeout_s": _TIMER,
    "targets.wait_initial_s": _WAIT,
    "targets.wait_max_s": _SPAN,
    "targets.wait_exp_base": _within(1, MOST_WAIT_EXP_BASE, "a number from 1 to 1000"),
    "targets.max_age_s": _SPAN,
    "targets.retry_schedule_s": (
        lambda value: bool(value) and all(_WAIT[0](wait) for wait in value),
        "a non-empty list of numbers from 0 to 1e9 (about 31 years)",
    ),
    "targets.rate_per_s": _within(
        FEWEST_PER_S, MOST_PER_S, "a number from 1e-9 to 1e9 (deliveries per second)"
    ),
    # 0 asks the OS for a free port, which tests use.
    "admin.port": (lambda value: 0 <= value <= 65535, "an integer from 0 to 65535"),
    "admin.allowed_hosts": (
        lambda value: all(_is_host_name(each) for each in value),
        "a list of host names or IP addresses, without scheme or port",
    ),
    "dispatcher.poll_interval_s": _TIMER,
}
