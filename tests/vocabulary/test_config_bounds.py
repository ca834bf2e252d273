"""Tests for what a configuration file may hold beyond its types: how deep its arrays and tables
nest, the range of every duration and rate, and what a target's name may hold.

Each case writes a small valid file with a few keys set, and compares the one-line ConfigError
whole, the file's path written as ``<file>``.
"""

from __future__ import annotations

import math
import socket
import sqlite3
import typing
from collections.abc import Mapping
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import (
    AdminConfig,
    DispatcherConfig,
    ListenConfig,
    OutboxConfig,
    TargetConfig,
    TlsConfig,
    TracingConfig,
    load_admin_config,
    load_config,
)
from gateway.delivery.backoff import RetryPolicy
from gateway.errors import ConfigError

BASE = """
[tls]
cert_file = "certs/server.pem"
key_file = "certs/server.key"
client_ca_file = "certs/meta-ca.pem"

[meta]
verify_tokens = ["verify-token-1"]
app_secrets = ["app-secret-1"]
"""
TARGET = '[[targets]]\nname = "crm"\nurl = "https://crm.example/hook"\n'
DEEP = 3000  # far past where tomllib's recursive descent, or repr(), runs out of stack
TOO_DEEP = "arrays and tables nested more than 32 levels deep"


def write(folder: Path, text: str) -> Path:
    """``BASE`` and ``text``; keys of a ``[tls]`` in ``text`` join BASE's (TOML allows one)."""
    path = folder / "gateway.toml"
    if text.startswith("[tls]\n"):
        path.write_text(BASE.replace("[tls]\n", text, 1))
    else:
        path.write_text(BASE + text)
    return path


def rejection(folder: Path, text: str) -> str:
    """The message of the ConfigError that loading ``BASE + text`` raises, the path as
    ``<file>``; any other exception (a RecursionError) fails the test."""
    path = write(folder, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message
    return message.replace(str(path), "<file>", 1)


# --- Nesting -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "[listen]\nhost = " + "[" * DEEP + "]" * DEEP + "\n",
            f"<file>: {TOO_DEEP}",
            id="arrays-tomllib-cannot-read",
        ),
        pytest.param(
            "[listen]\nhost = " + "{a = " * DEEP + "1" + "}" * DEEP + "\n",
            f"<file>: {TOO_DEEP}",
            id="inline-tables-tomllib-cannot-read",
        ),
        pytest.param(
            "[listen]\nhost" + ".a" * DEEP + " = 1\n",
            f"<file>: listen.host: {TOO_DEEP}",
            id="dotted-key-tomllib-reads",
        ),
        pytest.param(
            "[listen" + ".a" * DEEP + "]\n",
            f"<file>: listen.a: {TOO_DEEP}",
            id="table-header-tomllib-reads",
        ),
        pytest.param(
            TARGET + "fields = " + "[" * DEEP + "]" * DEEP + "\n",
            f"<file>: {TOO_DEEP}",
            id="in-a-target",
        ),
        pytest.param(
            # [listen] is level 1, its 32 arrays levels 2 to 33.
            "[listen]\nhost = " + "[" * 32 + "]" * 32 + "\n",
            f"<file>: listen.host: {TOO_DEEP}",
            id="33-levels",
        ),
        pytest.param(
            # 32 levels are read, and the value is then what is wrong with it.
            "[listen]\nhost = " + "[" * 31 + "]" * 31 + "\n",
            "<file>: listen.host = " + "[" * 31 + "]" * 31 + ": expected a string",
            id="32-levels",
        ),
        pytest.param(
            # targets (1), its table (2), fields (3): the deepest the schema goes.
            TARGET + "fields = " + "[" * 30 + "]" * 30 + "\n",
            "<file>: targets[0].fields[0] = " + "[" * 29 + "]" * 29 + ": expected a string",
            id="32-levels-in-a-target",
        ),
        pytest.param(
            TARGET + "fields = " + "[" * 31 + "]" * 31 + "\n",
            f"<file>: targets[0].fields: {TOO_DEEP}",
            id="33-levels-in-a-target",
        ),
        pytest.param(
            "x = " + "[" * 40 + "]" * 40 + "\n",
            f"<file>: meta.x: {TOO_DEEP}",
            id="under-an-unknown-key",
        ),
    ],
)
def test_refuses_nesting_deeper_than_32_levels(tmp_path: Path, text: str, expected: str) -> None:
    """Arrays and tables nested deeper than any configuration needs are one ConfigError naming
    the file (and the key, when the parser read it): never a RecursionError, from tomllib's
    recursive descent or from showing the value in a message."""
    assert rejection(tmp_path, text) == expected


def test_admin_table_loads_beside_nesting_tomllib_cannot_read(tmp_path: Path) -> None:
    """`waba-gateway reload` finds the admin listener when another table nests too deep, as
    when it holds invalid TOML; nesting too deep in [admin] itself is its error."""
    deep = "[" * DEEP + "]" * DEEP
    path = write(tmp_path, f"[admin]\nport = 9999\n\n[listen]\nhost = {deep}\n")
    assert load_admin_config(path, {}) == AdminConfig(port=9999)

    path = write(tmp_path, f"[admin]\nallowed_hosts = {deep}\n")
    with pytest.raises(ConfigError) as info:
        load_admin_config(path, {})
    assert str(info.value) == f"{path}: {TOO_DEEP} in [admin]"
    path = write(tmp_path, "[admin]\nhost" + ".a" * DEEP + " = 1\n")
    with pytest.raises(ConfigError) as info:
        load_admin_config(path, {})
    assert str(info.value) == f"{path}: admin.host: {TOO_DEEP}"


@pytest.mark.parametrize("command", ["check", "serve"])
def test_check_and_serve_refuse_deep_nesting_in_one_line(
    tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command line prints the error as one `error:` line and exits 2, no traceback."""
    path = write(tmp_path, "[listen]\nhost = " + "[" * DEEP + "]" * DEEP + "\n")
    assert main([command, "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {path}: {TOO_DEEP}\n"


# --- Durations and rates -------------------------------------------------------------------------

TIMER = "a number from 0.01 to 1e9 (10 ms to about 31 years)"
SPAN = "a number > 0 and at most 1e9 (about 31 years)"
WAIT = "a number from 0 to 1e9 (about 31 years)"
WAITS = "a non-empty list of numbers from 0 to 1e9 (about 31 years)"
BUSY = "a number from 0.01 to 2147483.647 (SQLite's longest busy timeout, about 24.8 days)"
RATE = "a number from 1e-9 to 1e9 (deliveries per second)"
BASE_RANGE = "a number from 1 to 1000"


def setting(key: str, value: str) -> str:
    """The TOML text that sets ``key`` (``table.key``; ``targets.key`` on one target)."""
    table, _, name = key.partition(".")
    return f"{TARGET}{name} = {value}\n" if table == "targets" else f"[{table}]\n{name} = {value}\n"


def shown_key(key: str) -> str:
    """``key`` as a message names it: a target's with its index."""
    return key.replace("targets.", "targets[0].", 1)


# (key, value as the file writes it, as the message shows it: Python's spelling of the number
# TOML read, and the range expected)
OUT_OF_RANGE = [
    ("listen.idle_timeout_s", "1e30", "1e+30", TIMER),
    ("listen.idle_timeout_s", "0.009", "0.009", TIMER),
    ("listen.request_timeout_s", "0.0009", "0.0009", TIMER),
    ("tls.watch_interval_s", "1e10", "10000000000.0", TIMER),
    ("tls.watch_interval_s", "1e-3", "0.001", TIMER),
    ("outbox.lease_s", "1e-4", "0.0001", TIMER),
    ("outbox.lease_s", "0", "0", TIMER),
    ("outbox.dedup_window_s", "1e300", "1e+300", SPAN),
    ("outbox.dedup_window_s", "0", "0", SPAN),
    ("outbox.retention_s", "-1", "-1", SPAN),
    ("outbox.dead_retention_s", "1_000_000_001", "1000000001", SPAN),
    ("outbox.busy_timeout_s", "2147483.648", "2147483.648", BUSY),
    ("outbox.busy_timeout_s", "1e9", "1000000000.0", BUSY),
    ("outbox.busy_timeout_s", "0.0009", "0.0009", BUSY),
    ("dispatcher.poll_interval_s", "1e-320", "1e-320", TIMER),
    ("dispatcher.poll_interval_s", "0.0005", "0.0005", TIMER),
    ("targets.timeout_s", "1e300", "1e+300", TIMER),
    ("targets.timeout_s", "1e10", "10000000000.0", TIMER),
    ("targets.timeout_s", "0", "0", TIMER),
    ("targets.wait_max_s", "1e10", "10000000000.0", SPAN),
    ("targets.max_age_s", "1e12", "1000000000000.0", SPAN),
    ("targets.wait_initial_s", "1e10", "10000000000.0", WAIT),
    ("targets.wait_initial_s", "-0.5", "-0.5", WAIT),
    ("targets.retry_schedule_s", "[1, 1e10]", "[1, 10000000000.0]", WAITS),
    ("targets.rate_per_s", "1e308", "1e+308", RATE),
    ("targets.rate_per_s", "1e-300", "1e-300", RATE),
    ("targets.rate_per_s", "2e9", "2000000000.0", RATE),
    ("targets.rate_per_s", "0", "0", RATE),
    ("targets.wait_exp_base", "1e308", "1e+308", BASE_RANGE),
    ("targets.wait_exp_base", "1001", "1001", BASE_RANGE),
]


@pytest.mark.parametrize(
    ("key", "value", "shown", "expected"),
    [pytest.param(*case, id=f"{case[0]}={case[1]}") for case in OUT_OF_RANGE],
)
def test_refuses_a_duration_or_rate_out_of_range(
    tmp_path: Path, key: str, value: str, shown: str, expected: str
) -> None:
    """Finite numbers too large or too small to mean anything are refused at load, naming the
    key and its range, before they reach a timer, a socket, SQLite or PostgreSQL."""
    message = rejection(tmp_path, setting(key, value))
    assert message == f"<file>: {shown_key(key)} = {shown}: expected {expected}"


# (key, value as the file writes it, the value read, other keys the value needs)
AT_EITHER_END: list[tuple[str, str, object, str]] = [
    ("listen.idle_timeout_s", "0.01", 0.01, ""),
    ("listen.request_timeout_s", "1e9", 1e9, ""),
    ("tls.watch_interval_s", "1e9", 1e9, ""),
    ("tls.watch_interval_s", "0.01", 0.01, ""),
    ("outbox.lease_s", "0.01", 0.01, ""),
    # A span is never waited for: the benchmarks keep every body new with a window of 1 us.
    ("outbox.dedup_window_s", "0.000001", 1e-6, ""),
    ("outbox.dedup_window_s", "1e9", 1e9, ""),
    ("outbox.retention_s", "1e9", 1e9, ""),
    ("outbox.dead_retention_s", "1e9", 1e9, ""),
    ("outbox.busy_timeout_s", "2147483.647", 2147483.647, ""),
    ("outbox.busy_timeout_s", "0.01", 0.01, ""),
    ("dispatcher.poll_interval_s", "0.01", 0.01, ""),
    ("dispatcher.poll_interval_s", "1e9", 1e9, ""),
    ("targets.timeout_s", "1e9", 1e9, ""),
    ("targets.timeout_s", "0.01", 0.01, ""),
    ("targets.wait_max_s", "0.001", 0.001, "wait_initial_s = 0\n"),
    ("targets.wait_initial_s", "1e9", 1e9, "wait_max_s = 1e9\n"),
    ("targets.max_age_s", "1e9", 1e9, ""),
    ("targets.max_age_s", "0.5", 0.5, ""),
    ("targets.retry_schedule_s", "[0, 1e9]", (0.0, 1e9), ""),
    ("targets.rate_per_s", "1e-9", 1e-9, ""),
    ("targets.rate_per_s", "1e9", 1e9, ""),
    ("targets.rate_per_s", "0.5", 0.5, ""),
    ("targets.wait_exp_base", "1000", 1000.0, ""),
    ("targets.wait_exp_base", "1", 1.0, ""),
]


@pytest.mark.parametrize(
    ("key", "value", "read", "beside"),
    [pytest.param(*case, id=f"{case[0]}={case[1]}") for case in AT_EITHER_END],
)
def test_takes_a_duration_or_rate_at_either_end_of_its_range(
    tmp_path: Path, key: str, value: str, read: object, beside: str
) -> None:
    """The ends of each range are values the file may hold, read as written."""
    config = load_config(write(tmp_path, setting(key, value) + beside), {})
    table, _, name = key.partition(".")
    section = config.targets[0] if table == "targets" else getattr(config, table)
    assert getattr(section, name) == read


_TABLES: Mapping[str, type] = {
    "listen": ListenConfig,
    "tls": TlsConfig,
    "outbox": OutboxConfig,
    "targets": TargetConfig,
    "dispatcher": DispatcherConfig,
    "tracing": TracingConfig,
}
_NUMBERS = [
    (table, name, hint)
    for table, cls in _TABLES.items()
    for name, hint in typing.get_type_hints(cls).items()
    if hint in (float, float | None, tuple[float, ...])
]


def test_every_number_key_of_the_schema_has_its_range_tested_here() -> None:
    """Each number key of the schema (a duration, a rate, the backoff's base) has a case out of
    its range above; tracing.sample_ratio, from 0 to 1, has its own in test_config."""
    keys = {f"{table}.{name}" for table, name, _ in _NUMBERS}
    assert keys - {"tracing.sample_ratio"} == {key for key, *_ in OUT_OF_RANGE}


@pytest.mark.parametrize(("table", "name", "hint"), _NUMBERS)
@pytest.mark.parametrize("value", ["1e300", "-1e300"])
def test_every_number_key_has_a_finite_range(
    tmp_path: Path, table: str, name: str, hint: object, value: str
) -> None:
    """No number key takes whatever finite number TOML can write: each has a range."""
    key = f"{table}.{name}"
    listed = hint == tuple[float, ...]
    message = rejection(tmp_path, setting(key, f"[{value}]" if listed else value))
    shown = f"[{float(value)!r}]" if listed else repr(float(value))
    assert message.startswith(f"<file>: {shown_key(key)} = {shown}: expected ")


def test_the_longest_duration_fits_a_socket_timeout() -> None:
    """1e9 s: a Redis target's timeout_s becomes its sockets' timeout, which Python keeps in
    nanoseconds of a 64-bit integer; past 9.2e9 s settimeout() raises OverflowError."""
    with socket.socket() as sock:
        sock.settimeout(1e9)
        with pytest.raises(OverflowError):
            sock.settimeout(1e10)


def test_the_longest_busy_timeout_is_the_one_sqlite_keeps() -> None:
    """2147483.647 s: sqlite3 hands SQLite the busy timeout in milliseconds of a C int; one
    millisecond more and SQLite is left with no busy timeout at all (a locked file fails at
    once)."""
    with sqlite3.connect(":memory:", timeout=2147483.647) as conn:
        assert conn.execute("PRAGMA busy_timeout").fetchone() == (2**31 - 1,)
    with sqlite3.connect(":memory:", timeout=2147483.648) as conn:
        assert conn.execute("PRAGMA busy_timeout").fetchone() == (0,)


def test_the_largest_backoff_base_never_overflows() -> None:
    """A base of 1000 raised to the largest exponent the backoff uses stays a finite float; a
    larger base, such as 1e308, overflows it."""
    longest = RetryPolicy(
        attempts=1000, wait_initial_s=1e9, wait_max_s=1e9, wait_exp_base=1000.0, max_age_s=1e9
    )
    assert all(math.isfinite(longest.cap(attempt)) for attempt in range(1, 1001))
    huge = RetryPolicy(
        attempts=3, wait_initial_s=1.0, wait_max_s=300.0, wait_exp_base=1e308, max_age_s=1e9
    )
    with pytest.raises(OverflowError):
        huge.cap(3)


# --- Target names --------------------------------------------------------------------------------

NAME = (
    "a name of printable characters other than '/', '{' and '}', without white space at either"
    " end, and not '.' or '..'"
)


def _targets(*names: str) -> str:
    return "".join(
        f'[[targets]]\nname = "{name}"\nurl = "https://crm.example/{index}"\n'
        for index, name in enumerate(names)
    )


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        pytest.param(("a", "a "), "targets[1].name = 'a '", id="trailing-space-beside-its-twin"),
        pytest.param((" a",), "targets[0].name = ' a'", id="leading-space"),
        pytest.param(("a\\t",), "targets[0].name = 'a\\t'", id="trailing-tab"),
        pytest.param(("a\\nb",), "targets[0].name = 'a\\nb'", id="newline"),
        pytest.param(("a\\rb",), "targets[0].name = 'a\\rb'", id="carriage-return"),
        pytest.param(("a\\u001bb",), "targets[0].name = 'a\\x1bb'", id="escape"),
        pytest.param(("a\\u007fb",), "targets[0].name = 'a\\x7fb'", id="delete"),
        pytest.param(("a\\u0085b",), "targets[0].name = 'a\\x85b'", id="c1-next-line"),
        pytest.param(("a\\u2028b",), "targets[0].name = 'a\\u2028b'", id="line-separator"),
        pytest.param(("a\\u202eb",), "targets[0].name = 'a\\u202eb'", id="right-to-left-override"),
        pytest.param(("a\\u200bb",), "targets[0].name = 'a\\u200bb'", id="zero-width-space"),
        pytest.param(("/",), "targets[0].name = '/'", id="slash"),
        pytest.param(("crm/eu",), "targets[0].name = 'crm/eu'", id="slash-inside"),
        pytest.param(("{crm}",), "targets[0].name = '{crm}'", id="braces"),
        pytest.param(("crm}",), "targets[0].name = 'crm}'", id="closing-brace"),
        pytest.param((".",), "targets[0].name = '.'", id="dot"),
        pytest.param(("..",), "targets[0].name = '..'", id="dot-dot"),
    ],
)
def test_refuses_a_target_name_that_cannot_be_shown_or_addressed(
    tmp_path: Path, names: tuple[str, ...], expected: str
) -> None:
    """A target's name is part of admin API and console paths, metric labels, JSON logs and
    the console's pages: it is refused when a path cannot carry it, a log line would break or
    hide at it, or it differs from another only by white space at its ends."""
    assert rejection(tmp_path, _targets(*names)) == f"<file>: {expected}: expected {NAME}"


@pytest.mark.parametrize(
    "name",
    ["crm", "archive", "crm-eu_2", "crm.v2", "...", "a b", "CRM (eu)", "café", "客户", "%2F", "#1"],
)
def test_takes_a_target_name_of_printable_characters(tmp_path: Path, name: str) -> None:
    """Any other printable text is a name, white space inside it too."""
    config = load_config(write(tmp_path, _targets(name)), {})
    assert [target.name for target in config.targets] == [name]


def test_checks_a_target_name_as_the_environment_expands_it(tmp_path: Path) -> None:
    """The rule holds for the name in force: a ${NAME} reference expanded."""
    path = write(tmp_path, _targets("${TARGET_NAME}"))
    with pytest.raises(ConfigError) as info:
        load_config(path, {"TARGET_NAME": "crm\n"})
    assert str(info.value) == f"{path}: targets[0].name = 'crm\\n': expected {NAME}"
    assert load_config(path, {"TARGET_NAME": "crm"}).targets[0].name == "crm"
