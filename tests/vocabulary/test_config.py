"""Tests for gateway.config: one TOML file in, a frozen Config or one precise ConfigError out.

Each case writes a small config: the minimal valid one (BASE) with some keys set, replaced or
removed. Error messages are compared whole, with the file's path written as ``<file>``.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from helpers import TargetOptions

from gateway.config import (
    DEFAULT_CONFIG_PATH,
    META_CLIENT_CN,
    AdminConfig,
    Config,
    DispatcherConfig,
    ListenConfig,
    MetaConfig,
    OutboxConfig,
    TargetConfig,
    TlsConfig,
    TracingConfig,
    default_config_path,
    load_admin_config,
    load_config,
    redact_url,
)
from gateway.config.rules import REDIS_SENDER_OPTIONS, redis_url_refusal
from gateway.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "gateway.example.toml"

# "table.key" (or "targets[i].key", or a top-level "key") -> the TOML text of its value.
Entries = Mapping[str, str | None]

BASE: dict[str, str] = {
    "tls.cert_file": '"certs/server.pem"',
    "tls.key_file": '"certs/server.key"',
    "tls.client_ca_file": '"certs/meta-ca.pem"',
    "meta.verify_tokens": '["verify-token-1"]',
    "meta.app_secrets": '["app-secret-1"]',
}
TARGET: dict[str, str] = {
    "targets[0].name": '"crm"',
    "targets[0].url": '"https://crm.example/hook"',
}
SECRET = "hunter2"


def render(entries: Entries) -> str:
    """TOML text for ``entries``; a value of None leaves the key out."""
    top: list[str] = []
    tables: dict[str, list[str]] = {}
    for dotted, value in entries.items():
        if value is None:
            continue
        table, _, key = dotted.rpartition(".")
        (tables.setdefault(table, []) if table else top).append(f"{key} = {value}")
    blocks = ["\n".join(top)]
    for table, lines in tables.items():
        header = "[[targets]]" if table.startswith("targets[") else f"[{table}]"
        blocks.append("\n".join([header, *lines]))
    return "\n\n".join(blocks) + "\n"


def write(folder: Path, entries: Entries) -> Path:
    path = folder / "gateway.toml"
    path.write_text(render({**BASE, **entries}))
    return path


def load(folder: Path, entries: Entries, env: Mapping[str, str] | None = None) -> Config:
    return load_config(write(folder, entries), env or {})


def rejection(folder: Path, entries: Entries, env: Mapping[str, str] | None = None) -> str:
    """The message of the ConfigError that loading ``entries`` raises, the path as ``<file>``."""
    path = write(folder, entries)
    with pytest.raises(ConfigError) as info:
        load_config(path, env or {})
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    return message.replace(str(path), "<file>", 1)


def test_loads_minimal_config_with_defaults(tmp_path: Path) -> None:
    """Only the required keys set: every other value is the dataclass default."""
    config = load(tmp_path, {})
    assert config == Config(
        tls=TlsConfig(
            cert_file=tmp_path / "certs/server.pem",
            key_file=tmp_path / "certs/server.key",
            client_ca_file=tmp_path / "certs/meta-ca.pem",
        ),
        meta=MetaConfig(verify_tokens=("verify-token-1",), app_secrets=("app-secret-1",)),
        source=tmp_path / "gateway.toml",
    )
    assert config.listen == ListenConfig()
    assert config.tls.client_auth == "required"
    assert config.tls.client_cn == (META_CLIENT_CN,)
    assert config.tls.session_tickets == 0
    assert config.outbox == OutboxConfig()
    assert config.targets == ()
    assert config.admin == AdminConfig()
    assert config.dispatcher == DispatcherConfig()
    assert config.log_level == "info"
    assert config.log_format == "text"


def test_loads_every_key_as_written(tmp_path: Path) -> None:
    """A config setting every key yields exactly those values, lists as tuples, paths as Paths."""
    text = """
        [listen]
        host = "127.0.0.1"
        port = 9443
        path = "/hooks/meta"
        max_body_bytes = 8388608
        workers = 4
        proxy_protocol = true

        [tls]
        cert_file = "a/server.pem"
        key_file = "a/server.key"
        client_ca_file = "a/ca.pem"
        client_auth = "optional"
        client_cn = ["one.example", "two.example"]
        crl_file = "a/crl.pem"
        session_tickets = 1
        watch_files = true
        watch_interval_s = 2

        [meta]
        verify_tokens = ["vt-1", "vt-2"]
        app_secrets = ["as-1", "as-2"]

        [outbox]
        path = "data/outbox.db"
        dedup_window_s = 3600
        retention_s = 86400.5

        [[targets]]
        name = "crm"
        url = "https://crm.example/hook"
        fields = ["messages", "account_update"]
        waba_ids = ["1001"]
        phone_number_ids = ["2001", "2002"]
        timeout_s = 2.5
        attempts = 3
        wait_initial_s = 0
        wait_max_s = 60
        wait_exp_base = 3
        max_age_s = 7200
        split = "change"
        secret = "target-secret"
        signature = "meta"
        concurrency = 8
        pipeline = 4
        ca_file = "a/internal-ca.pem"
        cert_file = "a/gateway-client.pem"
        key_file = "a/gateway-client.key"

        [[targets]]
        name = "archive"
        url = "http://127.0.0.1:9000/"

        [admin]
        enabled = false
        host = "0.0.0.0"
        port = 0
        token = "admin-token"

        [dispatcher]
        poll_interval_s = 2
        batch_size = 10

        [log]
        level = "debug"
        format = "json"
    """
    path = tmp_path / "gateway.toml"
    path.write_text(text.replace("\n        ", "\n"))
    assert load_config(path, {}) == Config(
        listen=ListenConfig(
            host="127.0.0.1",
            port=9443,
            path="/hooks/meta",
            max_body_bytes=8388608,
            workers=4,
            proxy_protocol=True,
        ),
        tls=TlsConfig(
            cert_file=tmp_path / "a/server.pem",
            key_file=tmp_path / "a/server.key",
            client_ca_file=tmp_path / "a/ca.pem",
            client_auth="optional",
            client_cn=("one.example", "two.example"),
            crl_file=tmp_path / "a/crl.pem",
            session_tickets=1,
            watch_files=True,
            watch_interval_s=2.0,
        ),
        meta=MetaConfig(verify_tokens=("vt-1", "vt-2"), app_secrets=("as-1", "as-2")),
        outbox=OutboxConfig(
            path=tmp_path / "data/outbox.db", dedup_window_s=3600.0, retention_s=86400.5
        ),
        targets=(
            TargetConfig(
                name="crm",
                url="https://crm.example/hook",
                fields=("messages", "account_update"),
                waba_ids=("1001",),
                phone_number_ids=("2001", "2002"),
                timeout_s=2.5,
                attempts=3,
                wait_initial_s=0.0,
                wait_max_s=60.0,
                wait_exp_base=3.0,
                max_age_s=7200.0,
                split="change",
                secret="target-secret",
                signature="meta",
                concurrency=8,
                pipeline=4,
                ca_file=tmp_path / "a/internal-ca.pem",
                cert_file=tmp_path / "a/gateway-client.pem",
                key_file=tmp_path / "a/gateway-client.key",
            ),
            TargetConfig(name="archive", url="http://127.0.0.1:9000/"),
        ),
        admin=AdminConfig(enabled=False, host="0.0.0.0", port=0, token="admin-token"),
        dispatcher=DispatcherConfig(poll_interval_s=2.0, batch_size=10),
        log_level="debug",
        log_format="json",
        source=path,
    )


def test_accepts_integer_where_number_is_expected(tmp_path: Path) -> None:
    """``timeout_s = 10`` is read as the float 10.0."""
    config = load(tmp_path, {**TARGET, "targets[0].timeout_s": "10"})
    assert config.targets[0].timeout_s == 10.0
    assert isinstance(config.targets[0].timeout_s, float)


@pytest.mark.parametrize(
    ("entries", "env", "read", "expected"),
    [
        pytest.param(
            {"meta.app_secrets": '["${A}", "${B}"]'},
            {"A": "first", "B": "second"},
            lambda config: config.meta.app_secrets,
            ("first", "second"),
            id="inside-list",
        ),
        pytest.param(
            {**TARGET, "targets[0].url": '"https://${HOST}:${PORT}/hook"'},
            {"HOST": "crm.example", "PORT": "8443"},
            lambda config: config.targets[0].url,
            "https://crm.example:8443/hook",
            id="several-in-one-string",
        ),
        pytest.param(
            {"admin.token": '"${TOKEN}"'},
            {"TOKEN": "${NOT_EXPANDED}"},
            lambda config: config.admin.token,
            "${NOT_EXPANDED}",
            id="value-from-environment-not-expanded-again",
        ),
        pytest.param(
            {"tls.cert_file": '"${CERTS}/server.pem"'},
            {"CERTS": "/srv/certs"},
            lambda config: config.tls.cert_file,
            Path("/srv/certs/server.pem"),
            id="path",
        ),
        pytest.param(
            {"listen.host": '"price$5"'},
            {},
            lambda config: config.listen.host,
            "price$5",
            id="dollar-without-brace-is-text",
        ),
    ],
)
def test_expands_environment_variables(
    tmp_path: Path,
    entries: Entries,
    env: Mapping[str, str],
    read: Callable[[Config], object],
    expected: object,
) -> None:
    """``${NAME}`` anywhere in a string, lists included, is replaced from the environment."""
    assert read(load(tmp_path, entries, env)) == expected


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        (
            {"meta.app_secrets": '["${WABA_APP_SECRET}"]'},
            "<file>: meta.app_secrets[0] = '${WABA_APP_SECRET}': "
            "environment variable WABA_APP_SECRET is not set",
        ),
        (
            {"listen.host": '"${LISTEN_HOST}"'},
            "<file>: listen.host = '${LISTEN_HOST}': environment variable LISTEN_HOST is not set",
        ),
        (
            {**TARGET, "targets[0].url": '"https://${SET}/${UNSET}"'},
            "<file>: targets[0].url = 'https://${SET}/${UNSET}': "
            "environment variable UNSET is not set",
        ),
    ],
)
def test_rejects_unset_environment_variable(
    tmp_path: Path, entries: Entries, expected: str
) -> None:
    """A reference to a variable missing from the environment is an error, not an empty string."""
    assert rejection(tmp_path, entries, {"SET": "crm.example"}) == expected


@pytest.mark.parametrize("text", ["${}", "${1ST}", "${A-B}", "${OPEN", "${A}${"])
def test_rejects_malformed_reference(tmp_path: Path, text: str) -> None:
    """A ``${`` that does not start a valid ``${NAME}`` is a typo, reported as such."""
    message = rejection(tmp_path, {"listen.host": f'"{text}"'}, {"A": "x", "OPEN": "x"})
    assert message == (
        f"<file>: listen.host = {text!r}: "
        "expected ${NAME} references, NAME made of letters, digits and '_'"
    )


TOP_KEYS = "admin, dispatcher, listen, log, meta, outbox, targets, tls, tracing"
TARGET_KEYS = (
    "attempts, burst, ca_file, cert_file, concurrency, fields, key_file, kind, "
    "max_age_s, maxlen, message_types, name, order, phone_number_ids, pipeline, "
    "rate_per_s, retry_schedule_s, secret, signature, split, statuses, stream, subject, "
    "timeout_s, url, waba_ids, wait_exp_base, wait_initial_s, wait_max_s"
)


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        pytest.param(
            {"debug": "true"},
            f"<file>: debug = true: expected one of the keys {TOP_KEYS}",
            id="top-level-key",
        ),
        pytest.param(
            {"lsiten.port": "8443"},
            f"<file>: lsiten = <hidden>: expected one of the keys {TOP_KEYS}",
            id="top-level-table",
        ),
        pytest.param(
            {"listen.hots": '"0.0.0.0"'},
            "<file>: listen.hots = '0.0.0.0': "
            "expected one of the keys host, idle_timeout_s, loop, max_body_bytes, path, port, "
            "proxy_protocol, request_timeout_s, workers",
            id="nested",
        ),
        pytest.param(
            {"log.lvl": '"debug"'},
            "<file>: log.lvl = 'debug': expected one of the keys format, level",
            id="log",
        ),
        pytest.param(
            {**TARGET, "targets[0].retries": "3"},
            f"<file>: targets[0].retries = 3: expected one of the keys {TARGET_KEYS}",
            id="inside-target",
        ),
        pytest.param(
            {"listen.tls.port": "1"},
            "<file>: listen.tls = <hidden>: "
            "expected one of the keys host, idle_timeout_s, loop, max_body_bytes, path, port, "
            "proxy_protocol, request_timeout_s, workers",
            id="nested-table",
        ),
    ],
)
def test_rejects_unknown_key_naming_file_and_path(
    tmp_path: Path, entries: Entries, expected: str
) -> None:
    """A misspelt table or key stops loading; the message names the key and the known ones."""
    assert rejection(tmp_path, entries) == expected


@pytest.mark.parametrize(
    ("entries", "shown"),
    [
        ({"meta.app_secret": f'"{SECRET}"'}, "<hidden>"),
        ({"meta.verify_token": f'["{SECRET}"]'}, "<hidden>"),
        ({"admin.tokn": f'"{SECRET}"'}, "<hidden>"),
        ({"admin.bearer_token": f'"{SECRET}"'}, "<hidden>"),
        ({**TARGET, "targets[0].secrt": f'"{SECRET}"'}, "<hidden>"),
        ({**TARGET, "targets[0].api_key": f'"{SECRET}"'}, "<hidden>"),
        ({"outbox.ulr": f'"postgresql://u:{SECRET}@db/x"'}, "<hidden>"),
        ({"outbox.password": f'"{SECRET}"'}, "<hidden>"),
        ({"admin.prot": "8081"}, "8081"),
        ({"listen.worker": "2"}, "2"),
        ({**TARGET, "targets[0].waba_id": '["1001"]'}, "['1001']"),
        ({"tls.clientcn": '"client.example"'}, "'client.example'"),
    ],
)
def test_a_misspelt_keys_value_is_shown_unless_it_may_be_a_secret(
    tmp_path: Path, entries: Entries, shown: str
) -> None:
    """The value helps find the misspelt key; a name like a secret's keeps it hidden."""
    message = rejection(tmp_path, entries)
    key = next(k for k in entries if k not in TARGET)
    assert message.startswith(f"<file>: {key} = {shown}: expected one of the keys ")
    assert SECRET not in message


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ({"listen.port": '"8443"'}, "<file>: listen.port = '8443': expected an integer"),
        ({"listen.port": "8443.0"}, "<file>: listen.port = 8443.0: expected an integer"),
        ({"listen.workers": "true"}, "<file>: listen.workers = true: expected an integer"),
        (
            {**TARGET, "targets[0].timeout_s": "true"},
            "<file>: targets[0].timeout_s = true: expected a finite number",
        ),
        (
            {**TARGET, "targets[0].timeout_s": '"10"'},
            "<file>: targets[0].timeout_s = '10': expected a finite number",
        ),
        (
            {**TARGET, "targets[0].max_age_s": "inf"},
            "<file>: targets[0].max_age_s = inf: expected a finite number",
        ),
        ({"admin.enabled": "1"}, "<file>: admin.enabled = 1: expected true or false"),
        (
            {"listen.proxy_protocol": '"yes"'},
            "<file>: listen.proxy_protocol = 'yes': expected true or false",
        ),
        (
            {"listen.proxy_protocol": "1"},
            "<file>: listen.proxy_protocol = 1: expected true or false",
        ),
        ({"admin.enabled": '"yes"'}, "<file>: admin.enabled = 'yes': expected true or false"),
        ({"tls.cert_file": "42"}, "<file>: tls.cert_file = 42: expected a string"),
        (
            {"tls.client_cn": '"x.example"'},
            "<file>: tls.client_cn = 'x.example': expected a list of strings",
        ),
        ({"tls.client_cn": "[1]"}, "<file>: tls.client_cn[0] = 1: expected a string"),
        (
            {**TARGET, "targets[0].waba_ids": "[1001]"},
            "<file>: targets[0].waba_ids[0] = 1001: expected a string",
        ),
        ({"log.level": "1"}, "<file>: log.level = 1: expected a string"),
        ({"listen": "5"}, "<file>: listen = <hidden>: expected a table"),
        (
            {"targets.name": '"crm"'},
            "<file>: targets = <hidden>: expected an array of tables ([[targets]])",
        ),
    ],
)
def test_rejects_wrong_type(tmp_path: Path, entries: Entries, expected: str) -> None:
    """A value of the wrong TOML type is named with its key; a bool is not an integer."""
    assert rejection(tmp_path, entries) == expected


BEYOND_INT64 = "expected an integer from -2**63 to 2**63 - 1, as TOML's integers are"
# The ranges of durations (timeouts and intervals, spans, waits that may be 0) and rates.
TIMER = "a number from 0.01 to 1e9 (10 ms to about 31 years)"
SPAN = "a number > 0 and at most 1e9 (about 31 years)"
WAIT = "a number from 0 to 1e9 (about 31 years)"
WAITS = "a non-empty list of numbers from 0 to 1e9 (about 31 years)"
RATE = "a number from 1e-9 to 1e9 (deliveries per second)"


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        pytest.param(
            {"listen.port": str(2**63)},
            f"listen.port = <an integer of 64 bits>: {BEYOND_INT64}",
            id="just-beyond-64-bits",
        ),
        pytest.param(
            {**TARGET, "targets[0].attempts": "99999999999999999999"},
            f"targets[0].attempts = <an integer of 67 bits>: {BEYOND_INT64}",
            id="a-count",
        ),
        pytest.param(
            {"listen.idle_timeout_s": "9" * 400},
            f"listen.idle_timeout_s = <an integer of 1329 bits>: {BEYOND_INT64}",
            id="a-duration-float-cannot-hold",
        ),
        pytest.param(
            {**TARGET, "targets[0].retry_schedule_s": f"[1, -{'9' * 400}]"},
            f"targets[0].retry_schedule_s[1] = <an integer of 1329 bits>: {BEYOND_INT64}",
            id="in-a-list-of-numbers",
        ),
        pytest.param(
            {"dispatcher.batch_size": "0x" + "f" * 4000},
            f"dispatcher.batch_size = <an integer of 16000 bits>: {BEYOND_INT64}",
            id="more-digits-than-int-to-text-converts",
        ),
    ],
)
def test_rejects_integers_beyond_64_bits_in_one_line(
    tmp_path: Path, entries: Entries, expected: str
) -> None:
    """TOML's integers are 64-bit, but tomllib reads any: a bigger one is refused naming its key,
    not an OverflowError from float() at load or from SQLite at run time."""
    assert rejection(tmp_path, entries) == f"<file>: {expected}"


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ({"listen.port": "0"}, "listen.port = 0: expected an integer from 1 to 65535"),
        ({"listen.port": "65536"}, "listen.port = 65536: expected an integer from 1 to 65535"),
        ({"admin.port": "-1"}, "admin.port = -1: expected an integer from 0 to 65535"),
        ({"admin.port": "65536"}, "admin.port = 65536: expected an integer from 0 to 65535"),
        (
            {"tls.session_tickets": "-1"},
            "tls.session_tickets = -1: expected an integer from 0 to 8",
        ),
        ({"tls.session_tickets": "9"}, "tls.session_tickets = 9: expected an integer from 0 to 8"),
        (
            {"listen.path": '"webhook"'},
            "listen.path = 'webhook': expected a path starting with '/'",
        ),
        ({"listen.max_body_bytes": "0"}, "listen.max_body_bytes = 0: expected an integer >= 1"),
        ({"listen.workers": "0"}, "listen.workers = 0: expected an integer >= 1"),
        (
            {"tls.client_auth": '"yes"'},
            "tls.client_auth = 'yes': expected one of 'required', 'optional', 'off'",
        ),
        ({"listen.loop": '"trio"'}, "listen.loop = 'trio': expected one of 'asyncio', 'uvloop'"),
        ({"tls.client_cn": "[]"}, "tls.client_cn = []: expected a non-empty list of strings"),
        (
            {"meta.verify_tokens": "[]"},
            "meta.verify_tokens = []: expected a non-empty list of strings",
        ),
        ({"meta.app_secrets": "[]"}, "meta.app_secrets = []: expected a non-empty list of strings"),
        ({"outbox.dedup_window_s": "0"}, f"outbox.dedup_window_s = 0: expected {SPAN}"),
        ({"outbox.retention_s": "-1"}, f"outbox.retention_s = -1: expected {SPAN}"),
        (
            {"dispatcher.poll_interval_s": "0"},
            f"dispatcher.poll_interval_s = 0: expected {TIMER}",
        ),
        ({"dispatcher.batch_size": "0"}, "dispatcher.batch_size = 0: expected an integer >= 1"),
        (
            {"log.level": '"verbose"'},
            "log.level = 'verbose': expected one of 'debug', 'info', 'warning', 'error'",
        ),
    ],
)
def test_rejects_out_of_range_value(tmp_path: Path, entries: Entries, expected: str) -> None:
    """Listener, TLS, Meta, outbox, dispatcher and log values outside their range are errors."""
    assert rejection(tmp_path, entries) == f"<file>: {expected}"


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("url", '"ftp://x"', "url = 'ftp://x': expected an http:// or https:// URL"),
        ("url", '"https://"', "url = 'https://': expected an http:// or https:// URL"),
        (
            "url",
            '"crm.example/hook"',
            "url = 'crm.example/hook': expected an http:// or https:// URL",
        ),
        (
            "url",
            '"http://crm example/"',
            "url = 'http://crm example/': expected an http:// or https:// URL",
        ),
        (
            "url",
            '"http://crm:99999/"',
            "url = 'http://crm:99999/': expected an http:// or https:// URL",
        ),
        (
            "url",
            '"http://inbox..internal:8080/hook"',
            "url = 'http://inbox..internal:8080/hook': expected an http:// or https:// URL",
        ),
        ("name", '""', "name = '': expected a non-empty string"),
        ("attempts", "0", "attempts = 0: expected an integer >= 1"),
        ("timeout_s", "0", f"timeout_s = 0: expected {TIMER}"),
        ("timeout_s", "-1.5", f"timeout_s = -1.5: expected {TIMER}"),
        ("wait_initial_s", "-0.5", f"wait_initial_s = -0.5: expected {WAIT}"),
        ("wait_max_s", "0", f"wait_max_s = 0: expected {SPAN}"),
        ("wait_exp_base", "0.5", "wait_exp_base = 0.5: expected a number from 1 to 1000"),
        ("max_age_s", "0", f"max_age_s = 0: expected {SPAN}"),
        ("split", '"entry"', "split = 'entry': expected one of 'none', 'change'"),
        ("signature", '"hub"', "signature = 'hub': expected one of 'gateway', 'meta'"),
        ("concurrency", "0", "concurrency = 0: expected an integer >= 1"),
        ("pipeline", "0", "pipeline = 0: expected an integer >= 1"),
        ("fields", '["messages", ""]', "fields[1] = '': expected a non-empty string"),
        ("secret", '""', "secret = '': expected a non-empty string"),
        ("order", '"message"', "order = 'message': expected one of 'none', 'conversation'"),
        ("rate_per_s", "0", f"rate_per_s = 0: expected {RATE}"),
        ("burst", "0", "burst = 0: expected an integer >= 1"),
        ("statuses", '["read", ""]', "statuses[1] = '': expected a non-empty string"),
        ("message_types", "[1]", "message_types[0] = 1: expected a string"),
        ("retry_schedule_s", "[]", f"retry_schedule_s = []: expected {WAITS}"),
        ("retry_schedule_s", "[1, -2]", f"retry_schedule_s = [1, -2]: expected {WAITS}"),
        (
            "retry_schedule_s",
            '[1, "10"]',
            "retry_schedule_s = [1, '10']: expected a list of numbers",
        ),
    ],
)
def test_rejects_bad_target_value(tmp_path: Path, key: str, value: str, expected: str) -> None:
    """Each target key is checked: URL scheme and host, counts >= 1, durations and rates in
    range."""
    message = rejection(tmp_path, {**TARGET, f"targets[0].{key}": value})
    assert message == f"<file>: targets[0].{expected}"


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        (
            {"targets[0].wait_initial_s": "5", "targets[0].wait_max_s": "2"},
            "targets[0].wait_max_s = 2: expected a number >= targets[0].wait_initial_s (5)",
        ),
        (
            {"targets[0].wait_initial_s": "600"},
            "targets[0].wait_initial_s = 600: expected a number <= targets[0].wait_max_s (300)",
        ),
    ],
)
def test_rejects_wait_max_below_wait_initial(
    tmp_path: Path, entries: Entries, expected: str
) -> None:
    """``wait_max_s`` caps the backoff, so it cannot be below ``wait_initial_s``; the key set in
    the file is the one blamed."""
    assert rejection(tmp_path, {**TARGET, **entries}) == f"<file>: {expected}"


@pytest.mark.parametrize("key", ["wait_initial_s", "wait_max_s", "wait_exp_base"])
def test_rejects_retry_schedule_beside_exponential_backoff(tmp_path: Path, key: str) -> None:
    """An explicit schedule and an exponential setting for one target is an error naming both."""
    entries = {**TARGET, "targets[0].retry_schedule_s": "[1, 10]", f"targets[0].{key}": "2"}
    assert rejection(tmp_path, entries) == (
        f"<file>: targets[0].retry_schedule_s and targets[0].{key} are both set: keep"
        " retry_schedule_s for explicit waits, or the wait_* keys for exponential backoff,"
        " not both"
    )


def test_reads_delivery_shaping_keys_with_their_defaults(tmp_path: Path) -> None:
    """order, rate_per_s, burst, content filters and the schedule read as written; burst
    defaults to one second's worth of the rate, at least one."""
    plain = load(tmp_path, TARGET).targets[0]
    assert (plain.order, plain.rate_per_s, plain.burst, plain.retry_schedule_s) == (
        "none",
        None,
        None,
        (),
    )
    assert (plain.message_types, plain.statuses) == ((), ())
    shaped = load(
        tmp_path,
        {
            **TARGET,
            "targets[0].order": '"conversation"',
            "targets[0].rate_per_s": "2.5",
            "targets[0].message_types": '["text", "image"]',
            "targets[0].statuses": '["failed"]',
            "targets[0].retry_schedule_s": "[1, 10, 60.5]",
        },
    ).targets[0]
    assert shaped.order == "conversation"
    assert (shaped.rate_per_s, shaped.burst_size) == (2.5, 3)
    assert (shaped.message_types, shaped.statuses) == (("text", "image"), ("failed",))
    assert shaped.retry_schedule_s == (1.0, 10.0, 60.5)
    slow = load(tmp_path, {**TARGET, "targets[0].rate_per_s": "0.2"}).targets[0]
    assert slow.burst_size == 1
    sized = load(tmp_path, {**TARGET, "targets[0].rate_per_s": "5", "targets[0].burst": "50"})
    assert sized.targets[0].burst_size == 50
    assert load(tmp_path, {}).outbox.dead_retention_s == 30 * 86400


def test_rejects_duplicate_target_name(tmp_path: Path) -> None:
    """Two targets with one name are an error naming both."""
    entries = {**TARGET, "targets[1].name": '"crm"', "targets[1].url": '"https://b.example/"'}
    assert rejection(tmp_path, entries) == (
        "<file>: targets[1].name = 'crm': expected a unique name, 'crm' is already used by "
        "targets[0]"
    )


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        pytest.param(
            {**TARGET, "targets[0].signature": '"meta"'},
            "targets[0].signature = 'meta': expected 'gateway' unless targets[0].secret is set",
            id="split-none",
        ),
        pytest.param(
            {**TARGET, "targets[0].signature": '"meta"', "targets[0].split": '"change"'},
            "targets[0].signature = 'meta': expected 'gateway' unless targets[0].secret is set",
            id="split-change",
        ),
        pytest.param(
            {
                **TARGET,
                "targets[0].secret": '"s"',
                "targets[1].name": '"b"',
                "targets[1].url": '"https://b.example/"',
                "targets[1].signature": '"meta"',
            },
            "targets[1].signature = 'meta': expected 'gateway' unless targets[1].secret is set",
            id="the-target-without-one-named",
        ),
    ],
)
def test_rejects_meta_signature_without_target_secret(
    tmp_path: Path, entries: Entries, expected: str
) -> None:
    """Signing as Meta does needs the target's own secret: none set is an error naming the key."""
    assert rejection(tmp_path, entries) == f"<file>: {expected}"


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        pytest.param({}, "gateway", id="default"),
        pytest.param({"targets[0].signature": '"gateway"'}, "gateway", id="gateway-no-secret"),
        pytest.param(
            {"targets[0].signature": '"meta"', "targets[0].secret": '"${S}"'}, "meta", id="meta"
        ),
    ],
)
def test_reads_signature_style_defaulting_to_gateway(
    tmp_path: Path, entries: Entries, expected: str
) -> None:
    """``signature`` is "gateway" unless set; "meta" loads with a secret, "gateway" without."""
    config = load(tmp_path, {**TARGET, **entries}, env={"S": "from-env"})
    assert config.targets[0].signature == expected


@pytest.mark.parametrize("client_auth", ["required", "optional"])
def test_rejects_client_auth_without_client_ca(tmp_path: Path, client_auth: str) -> None:
    """Asking for client certificates needs a CA to check them against."""
    entries = {"tls.client_ca_file": None, "tls.client_auth": f'"{client_auth}"'}
    assert rejection(tmp_path, entries) == (
        f"<file>: tls.client_auth = {client_auth!r}: "
        "expected 'off' unless tls.client_ca_file is set"
    )


def test_accepts_client_auth_off_without_client_ca(tmp_path: Path) -> None:
    """With client certificates off no CA is needed."""
    config = load(tmp_path, {"tls.client_ca_file": None, "tls.client_auth": '"off"'})
    assert config.tls.client_ca_file is None


@pytest.mark.parametrize(
    "entries",
    [
        {"admin.host": '"0.0.0.0"'},
        {"admin.host": '"192.0.2.10"'},
        {"admin.host": '"admin.example"'},
    ],
)
def test_rejects_admin_off_loopback_without_token(tmp_path: Path, entries: Entries) -> None:
    """An enabled admin API reachable from other hosts must have a token."""
    host = str(entries["admin.host"]).strip('"')
    assert rejection(tmp_path, entries) == (
        f"<file>: admin.host = {host!r}: expected a loopback address unless admin.token is set"
    )


@pytest.mark.parametrize(
    "entries",
    [
        {"admin.host": '"127.0.0.1"'},
        {"admin.host": '"127.10.0.1"'},
        {"admin.host": '"::1"'},
        {"admin.host": '"localhost"'},
        {"admin.host": '"127.0.0.1"', "admin.token": '"short"'},
        {"admin.host": '"0.0.0.0"', "admin.token": '"admin-token-of-32-characters-0123"'},
        {"admin.host": '"0.0.0.0"', "admin.enabled": "false"},
    ],
)
def test_accepts_admin_on_loopback_or_with_token(tmp_path: Path, entries: Entries) -> None:
    """Loopback addresses need no token (a short one is warned about by check); a token of
    32 characters or more, or ``enabled = false``, allows any host."""
    load(tmp_path, entries)


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ({"tls.cert_file": None}, "tls.cert_file: required key is missing"),
        ({"tls.key_file": None}, "tls.key_file: required key is missing"),
        ({"meta.verify_tokens": None}, "meta.verify_tokens: required key is missing"),
        ({"meta.app_secrets": None}, "meta.app_secrets: required key is missing"),
        ({"targets[0].name": '"crm"'}, "targets[0].url: required key is missing"),
        ({"targets[0].url": '"https://crm.example/"'}, "targets[0].name: required key is missing"),
        (dict.fromkeys(BASE), "tls.cert_file: required key is missing"),
    ],
)
def test_rejects_missing_required_key(tmp_path: Path, entries: Entries, expected: str) -> None:
    """Keys without a default must be present; an empty file names the first of them."""
    assert rejection(tmp_path, entries) == f"<file>: {expected}"


@pytest.mark.parametrize(
    ("key", "read"),
    [
        ("tls.cert_file", lambda config: config.tls.cert_file),
        ("tls.key_file", lambda config: config.tls.key_file),
        ("tls.client_ca_file", lambda config: config.tls.client_ca_file),
        ("tls.crl_file", lambda config: config.tls.crl_file),
        ("outbox.path", lambda config: config.outbox.path),
    ],
)
def test_resolves_relative_paths_against_config_folder(
    tmp_path: Path, key: str, read: Callable[[Config], object]
) -> None:
    """Relative paths are taken from the config file's folder; absolute paths are kept."""
    folder = tmp_path / "etc"
    folder.mkdir()
    assert read(load(folder, {key: '"../certs/file"'})) == folder / "../certs/file"
    absolute = tmp_path / "abs" / "file"
    assert read(load(folder, {key: f"'{absolute}'"})) == absolute


def test_names_the_file_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages start with the path the caller passed, relative paths included."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config").mkdir()
    path = Path("config/gateway.toml")
    path.write_text(render({**BASE, **TARGET, "targets[0].url": '"ftp://x"'}))
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert str(info.value) == (
        f"{path}: targets[0].url = 'ftp://x': expected an http:// or https:// URL"
    )


@pytest.mark.parametrize(
    ("entries", "env", "expected"),
    [
        pytest.param(
            {"meta.app_secrets": f'["{SECRET}", 5]'},
            {},
            "meta.app_secrets[1] = <hidden>: expected a string",
            id="list-item-type",
        ),
        pytest.param(
            {"meta.verify_tokens": f'"{SECRET}"'},
            {},
            "meta.verify_tokens = <hidden>: expected a list of strings",
            id="list-type",
        ),
        pytest.param(
            {"meta.app_secrets": '["${S}${UNSET}"]'},
            {"S": SECRET},
            "meta.app_secrets[0] = '${S}${UNSET}': environment variable UNSET is not set",
            id="expanded-part",
        ),
        pytest.param(
            {"admin.token": f'"{SECRET}${{UNSET}}"'},
            {},
            "admin.token = <hidden>: environment variable UNSET is not set",
            id="literal-text-beside-a-reference",
        ),
        pytest.param(
            {**TARGET, "targets[0].secret": f'"${{S}}{SECRET}${{bad-name}}"'},
            {"S": "x"},
            "targets[0].secret = <hidden>: expected ${NAME} references, NAME made of letters,"
            " digits and '_'",
            id="literal-text-beside-a-malformed-reference",
        ),
        pytest.param(
            {"admin.token": "12345"},
            {},
            "admin.token = <hidden>: expected a string",
            id="admin-token-type",
        ),
        pytest.param(
            {**TARGET, "targets[0].secret": f"['{SECRET}']"},
            {},
            "targets[0].secret = <hidden>: expected a string",
            id="target-secret-type",
        ),
        pytest.param(
            {"meta.app_secret": f'"{SECRET}"'},
            {},
            "meta.app_secret = <hidden>: expected one of the keys app_secrets, verify_tokens",
            id="misspelt-key",
        ),
        pytest.param(
            {"admin.token": '"${EMPTY}"'},
            {"EMPTY": ""},
            "admin.token = '${EMPTY}': expected a non-empty string",
            id="empty-after-expansion",
        ),
        pytest.param(
            {"admin.token": '"${BLANK}"'},
            {"BLANK": " " * 40},
            "admin.token = '${BLANK}': expected a non-empty string",
            id="white-space-alone-after-expansion",
        ),
        pytest.param(
            {"meta.app_secrets": '["   "]'},
            {},
            "meta.app_secrets[0] = <hidden>: expected a non-empty string",
            id="an-app-secret-of-spaces",
        ),
    ],
)
def test_never_shows_secret_in_error_message(
    tmp_path: Path, entries: Entries, env: Mapping[str, str], expected: str
) -> None:
    """Secrets appear in messages only as their ``${NAME}`` reference or ``<hidden>``."""
    message = rejection(tmp_path, entries, env)
    assert SECRET not in message
    assert "12345" not in message
    assert message == f"<file>: {expected}"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param(None, "<file>: cannot read: No such file or directory", id="missing"),
        pytest.param(b"[listen\n", "<file>: invalid TOML: ", id="syntax"),
        pytest.param(b"[listen]\nport = 80\nport = 81\n", "<file>: invalid TOML: ", id="repeat"),
        pytest.param(b"\xff\xfe", "<file>: invalid TOML: ", id="not-utf-8"),
        pytest.param(
            b"[listen]\nport = " + b"9" * 5000 + b"\n",
            "<file>: invalid TOML: an integer of more than 4300 digits"
            " (TOML's integers are 64-bit)",
            id="integer-of-more-digits-than-int-reads",
        ),
    ],
)
def test_rejects_unreadable_file_or_invalid_toml(
    tmp_path: Path, content: bytes | None, expected: str
) -> None:
    """An unreadable or malformed file is a ConfigError naming the file and the reason."""
    path = tmp_path / "gateway.toml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    message = str(info.value).replace(str(path), "<file>", 1)
    assert message.startswith(expected)
    assert len(message) > len("<file>: invalid TOML: ")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, DEFAULT_CONFIG_PATH),
        ({"WABA_GATEWAY_CONFIG": ""}, DEFAULT_CONFIG_PATH),
        ({"WABA_GATEWAY_CONFIG": "/etc/waba/gateway.toml"}, Path("/etc/waba/gateway.toml")),
    ],
)
def test_default_config_path_honours_environment(env: Mapping[str, str], expected: Path) -> None:
    """``$WABA_GATEWAY_CONFIG`` picks the file; unset or empty means config/gateway.toml."""
    assert default_config_path(env) == expected


def test_example_config_loads() -> None:
    """The shipped example is valid once the variables it references are set."""
    names = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", EXAMPLE.read_text()))
    assert {"WABA_APP_SECRET", "WABA_VERIFY_TOKEN", "WABA_ADMIN_TOKEN"} <= names
    config = load_config(EXAMPLE, {name: f"value-of-{name}" for name in names})
    assert config.tls.client_auth == "required"
    assert config.tls.client_ca_file == EXAMPLE.parent / "../certs/meta-outbound-api-ca-2025-12.pem"
    assert config.meta.app_secrets == ("value-of-WABA_APP_SECRET",)
    assert [(t.name, t.split, t.fields) for t in config.targets] == [
        ("inbox", "none", ("messages",)),
        (
            "analytics",
            "change",
            ("message_template_quality_update", "message_template_status_update"),
        ),
    ]
    assert config.targets[1].secret == "value-of-ANALYTICS_WEBHOOK_SECRET"
    assert [t.signature for t in config.targets] == ["gateway", "meta"]
    assert config.admin.token == "value-of-WABA_ADMIN_TOKEN"


@pytest.mark.parametrize(
    ("table", "cls"),
    [
        ("listen", ListenConfig),
        ("tls", TlsConfig),
        ("meta", MetaConfig),
        ("outbox", OutboxConfig),
        ("targets", TargetConfig),
        ("admin", AdminConfig),
        ("dispatcher", DispatcherConfig),
    ],
)
def test_example_config_documents_every_key(table: str, cls: type[Any]) -> None:
    """Every key of every table appears in the example, set or commented out."""
    text = EXAMPLE.read_text()
    header = "[[targets]]" if table == "targets" else f"[{table}]"
    # The header on a line of its own: the comments mention "[[targets]]" too.
    assert f"\n{header}\n" in text
    section = text.split(f"\n{header}\n", 1)[1].split("\n[", 1)[0]
    for each in dataclasses.fields(cls):
        assert re.search(rf"^(# )?{each.name} = ", section, re.MULTILINE), each.name
    assert re.search(r"^level = ", text.split("[log]", 1)[1], re.MULTILINE)
    assert re.search(r"^format = ", text.split("[log]", 1)[1], re.MULTILINE)


def test_outbox_url_chooses_postgres_with_the_password_from_the_environment(
    tmp_path: Path,
) -> None:
    """outbox.url expands ${ENV}; the path keeps its default; repr hides the password."""
    config = load(
        tmp_path,
        {"outbox.url": '"postgresql://waba:${PG_PASSWORD}@db.internal:5432/waba"'},
        {"PG_PASSWORD": SECRET},
    )
    assert config.outbox.url == f"postgresql://waba:{SECRET}@db.internal:5432/waba"
    assert config.outbox.lease_s == 60.0
    assert SECRET not in repr(config.outbox)
    assert "postgresql://waba:***@db.internal:5432/waba" in repr(config.outbox)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://waba@/waba?host=/run/postgresql",
        "postgres://waba:pw@127.0.0.1/waba",
        "postgresql://localhost/waba",
    ],
)
def test_outbox_url_accepts_tcp_and_socket_forms(tmp_path: Path, url: str) -> None:
    """Both schemes, a Unix socket folder in ?host=, a URL without a password."""
    assert load(tmp_path, {"outbox.url": f'"{url}"'}).outbox.url == url


def test_outbox_path_and_url_together_are_refused_naming_both(tmp_path: Path) -> None:
    """One outbox: path (SQLite) or url (PostgreSQL), never both."""
    message = rejection(
        tmp_path, {"outbox.path": '"o.sqlite3"', "outbox.url": '"postgresql://h/db"'}
    )
    assert message.startswith("<file>: outbox.path and outbox.url are both set")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"mysql://h/db"', "<file>: outbox.url = <hidden>: expected a postgresql:// URL"),
        (
            '"http://u:${PW}@h/db"',
            "<file>: outbox.url = 'http://u:${PW}@h/db': expected a postgresql:// URL",
        ),
    ],
)
def test_outbox_url_of_another_scheme_is_refused_without_showing_it(
    tmp_path: Path, value: str, expected: str
) -> None:
    """Anything but postgresql:// is an error; a URL's text is shown only unexpanded."""
    assert rejection(tmp_path, {"outbox.url": value}, {"PW": SECRET}) == expected


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://waba:s3cret@db:5432/waba", "postgresql://waba:***@db:5432/waba"),
        (
            "postgresql://waba@/waba?host=/run/pg&password=s3cret",
            "postgresql://waba@/waba?host=/run/pg&password=***",
        ),
        ("postgresql://db/waba", "postgresql://db/waba"),
        ("postgresql://waba:pa55#w0rd@db/waba", "postgresql://waba:***@db/waba"),
        ("postgresql://waba:pa55/w0rd@db/waba", "postgresql://waba:***@db/waba"),
    ],
)
def test_database_urls_are_shown_without_their_password(url: str, shown: str) -> None:
    """redact_url hides the password in the user part and in a password= parameter."""
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            '[tls]\nbad = 1\n[admin]\nport = 9081\ntoken = "${T}"\n',
            AdminConfig(port=9081, token="tok"),
            id="misspelt-key-elsewhere",
        ),
        pytest.param(
            '[tls\n[admin] # the API\nhost = "::1"\nport = 9082\n[dispatcher]\nx =\n',
            AdminConfig(host="::1", port=9082),
            id="invalid-toml-elsewhere",
        ),
        pytest.param("[tls\n", AdminConfig(), id="no-admin-table"),
        pytest.param(
            "[admin]\nport = 0x\n", "<file>: invalid TOML in [admin]: ", id="invalid-admin"
        ),
        pytest.param(
            "[admin]\nport = " + "9" * 5000 + "\n",
            "<file>: invalid TOML in [admin]: an integer of more than 4300 digits"
            " (TOML's integers are 64-bit)",
            id="admin-integer-of-more-digits-than-int-reads",
        ),
        pytest.param(
            "[admin]\nport = 70000\n",
            "<file>: admin.port = 70000: expected an integer from 0 to 65535",
            id="admin-out-of-range",
        ),
    ],
)
def test_admin_table_is_read_even_when_the_rest_of_the_file_does_not_load(
    tmp_path: Path, text: str, expected: AdminConfig | str
) -> None:
    """load_admin_config: where `reload` finds the gateway to ask, whatever else is wrong."""
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    if isinstance(expected, AdminConfig):
        assert load_admin_config(path, {"T": "tok"}) == expected
        return
    with pytest.raises(ConfigError) as info:
        load_admin_config(path, {})
    assert str(info.value).replace(str(path), "<file>", 1).startswith(expected)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('["' + "ab" * 32 + '"]', ("ab" * 32,)),
        ('["' + ":".join(["AB"] * 32) + '"]', (":".join(["AB"] * 32),)),
        ("[]", ()),
        ('["' + "ab" * 31 + '"]', None),
        ('["' + "zz" * 32 + '"]', None),
        ('["' + ":".join(["AB"] * 31) + ':"]', None),
    ],
)
def test_meta_ca_fingerprints_are_sha256_in_either_form(
    tmp_path: Path, value: str, expected: tuple[str, ...] | None
) -> None:
    """tls.meta_ca_sha256: 64 hex digits, with or without colons; anything else is refused."""
    if expected is not None:
        assert load(tmp_path, {"tls.meta_ca_sha256": value}).tls.meta_ca_sha256 == expected
        return
    message = rejection(tmp_path, {"tls.meta_ca_sha256": value})
    assert message.startswith("<file>: tls.meta_ca_sha256 = ")
    assert message.endswith(
        "expected SHA-256 fingerprints, 64 hex digits each (colons between pairs allowed)"
    )


# Run in a child interpreter in which MODULE cannot be found, as where the extra that brings it
# is not installed (this one has them all: the test extra installs them).
_WITHOUT_MODULE = """
import sys
from pathlib import Path

sys.modules["MODULE"] = None  # the import system's own way to say a module is not there
from gateway.config import load_config
from gateway.errors import ConfigError
try:
    load_config(Path(sys.argv[1]), {})
except ConfigError as exc:
    print(exc)
"""


@pytest.mark.parametrize(
    ("missing", "entries", "expected"),
    [
        pytest.param("uvloop", {"listen.loop": '"asyncio"'}, "", id="asyncio-loop-loads"),
        pytest.param(
            "uvloop",
            {"listen.loop": '"uvloop"'},
            "<file>: listen.loop = 'uvloop': expected 'asyncio', or uvloop installed"
            " (pip install 'waba-gateway[speed]')",
            id="uvloop-needs-the-speed-extra",
        ),
        pytest.param("opentelemetry.sdk", {"tracing.enabled": "false"}, "", id="tracing-off-loads"),
        pytest.param(
            "opentelemetry.sdk",
            {"tracing.enabled": "true"},
            "<file>: tracing.enabled = true: expected false, or the otel extra installed"
            " (pip install 'waba-gateway[otel]')",
            id="tracing-needs-the-otel-extra",
        ),
    ],
)
def test_a_setting_whose_extra_is_not_installed_is_refused_naming_the_extra(
    tmp_path: Path, missing: str, entries: Entries, expected: str
) -> None:
    """Where an optional extra's module is not installed (uvloop, the OpenTelemetry SDK), the
    setting that needs it is refused at load, naming the key and the extra to install; the
    same file without it loads."""
    path = write(tmp_path, entries)
    script = _WITHOUT_MODULE.replace('"MODULE"', repr(missing))
    result = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert result.stdout.strip().replace(str(path), "<file>") == expected


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        pytest.param(
            {**TARGET, "targets[0].url": '"http://crm.example/hook"', "targets[0].ca_file": '"ca"'},
            "<file>: targets[0].ca_file = '<dir>/ca': expected no TLS file for an http:// target"
            " (targets[0].url = 'http://crm.example/hook')",
            id="ca-file-on-http",
        ),
        pytest.param(
            {
                **TARGET,
                "targets[0].url": '"http://crm:hunter2@crm.example/hook"',
                "targets[0].ca_file": '"ca"',
            },
            "<file>: targets[0].ca_file = '<dir>/ca': expected no TLS file for an http:// target"
            " (targets[0].url = 'http://***@crm.example/hook')",
            id="ca-file-on-http-the-url-s-user-info-hidden",
        ),
        pytest.param(
            {**TARGET, "targets[0].cert_file": '"client.pem"'},
            "<file>: targets[0].cert_file is set without targets[0].key_file: a client"
            " certificate needs both",
            id="cert-without-key",
        ),
        pytest.param(
            {**TARGET, "targets[0].key_file": '"client.key"'},
            "<file>: targets[0].key_file is set without targets[0].cert_file: a client"
            " certificate needs both",
            id="key-without-cert",
        ),
        pytest.param(
            {**TARGET, "targets[0].ca_file": "7"},
            "<file>: targets[0].ca_file = 7: expected a string",
            id="ca-file-not-a-string",
        ),
    ],
)
def test_rejects_target_tls_files_that_cannot_apply(
    tmp_path: Path, entries: Entries, expected: str
) -> None:
    """A target's CA or client certificate on an http:// URL, or half a key pair: refused."""
    assert rejection(tmp_path, entries).replace(str(tmp_path), "<dir>") == expected


@pytest.mark.parametrize(
    ("entries", "env", "expected"),
    [
        pytest.param({}, {}, TracingConfig(), id="off-by-default"),
        pytest.param(
            {
                "tracing.enabled": "true",
                "tracing.endpoint": '"http://collector:4318"',
                "tracing.service_name": '"edge-eu"',
                "tracing.sample_ratio": "0.25",
            },
            {"OTEL_SERVICE_NAME": "ignored", "OTEL_TRACES_SAMPLER_ARG": "0.5"},
            TracingConfig(
                enabled=True,
                endpoint="http://collector:4318",
                service_name="edge-eu",
                sample_ratio=0.25,
            ),
            id="the-file-wins",
        ),
        pytest.param(
            {"tracing.enabled": "true"},
            {"OTEL_SERVICE_NAME": "from-env", "OTEL_TRACES_SAMPLER_ARG": "0.5"},
            TracingConfig(enabled=True, service_name="from-env", sample_ratio=0.5),
            id="otel-variables-where-the-file-is-silent",
        ),
        pytest.param(
            {"tracing.enabled": "true"},
            {"OTEL_SERVICE_NAME": "  ", "OTEL_RESOURCE_ATTRIBUTES": "deployment=eu"},
            TracingConfig(enabled=True),
            id="a-blank-service-name-variable-is-none",
        ),
        pytest.param(
            {"tracing.enabled": "true"},
            {"OTEL_RESOURCE_ATTRIBUTES": "deployment=eu, service.name=edge%20eu ,team=x"},
            TracingConfig(enabled=True, service_name="edge eu"),
            id="service-name-from-the-resource-attributes",
        ),
        pytest.param(
            {"tracing.enabled": "true"},
            {"OTEL_SERVICE_NAME": "from-env", "OTEL_RESOURCE_ATTRIBUTES": "service.name=other"},
            TracingConfig(enabled=True, service_name="from-env"),
            id="the-service-name-variable-wins-over-the-resource-attributes",
        ),
        pytest.param(
            {"tracing.enabled": "true"},
            {"OTEL_TRACES_SAMPLER": "always_off", "OTEL_TRACES_SAMPLER_ARG": "0.5"},
            TracingConfig(enabled=True, sample_ratio=0.0),
            id="otel-sampler-where-the-file-is-silent",
        ),
        pytest.param(
            {"tracing.enabled": "true", "tracing.sample_ratio": "0.75"},
            {"OTEL_TRACES_SAMPLER": "always_off"},
            TracingConfig(enabled=True, sample_ratio=0.75),
            id="the-file-wins-over-the-sampler",
        ),
    ],
)
def test_tracing_section_takes_otel_variables_where_it_is_silent(
    tmp_path: Path, entries: dict[str, str], env: dict[str, str], expected: TracingConfig
) -> None:
    """[tracing] as written; a key left out comes from its OTEL_* variable, else the default."""
    assert load(tmp_path, entries, env).tracing == expected


@pytest.mark.parametrize(
    ("entries", "env", "expected"),
    [
        (
            {"tracing.endpoint": '"collector:4318"'},
            {},
            "<file>: tracing.endpoint = 'collector:4318': expected an http:// or https:// URL",
        ),
        (
            {"tracing.endpoint": '"http://collector..internal:4318"'},
            {},
            "<file>: tracing.endpoint = 'http://collector..internal:4318': expected an http://"
            " or https:// URL",
        ),
        (
            {"tracing.sample_ratio": "1.5"},
            {},
            "<file>: tracing.sample_ratio = 1.5: expected a number from 0 to 1",
        ),
        (
            {},
            {"OTEL_TRACES_SAMPLER_ARG": "half"},
            "<file>: tracing.sample_ratio is not set and OTEL_TRACES_SAMPLER_ARG = 'half' is not"
            " a number from 0 to 1",
        ),
        (
            {},
            {"OTEL_TRACES_SAMPLER": "xray"},
            "<file>: tracing.sample_ratio is not set and OTEL_TRACES_SAMPLER = 'xray' is not one"
            " of always_on, always_off, traceidratio, parentbased_always_on,"
            " parentbased_always_off, parentbased_traceidratio",
        ),
        (
            {"tracing.exporter": '"zipkin"'},
            {},
            "<file>: tracing.exporter = 'zipkin': expected one of the keys enabled, endpoint,"
            " sample_ratio, service_name",
        ),
    ],
)
def test_bad_tracing_values_are_refused_naming_the_key(
    tmp_path: Path, entries: dict[str, str], env: dict[str, str], expected: str
) -> None:
    """A bad [tracing] value, or a bad OTEL_* variable standing in for one, names its key."""
    assert rejection(tmp_path, entries, env) == expected


REDIS = {"targets[0].kind": '"redis"', "targets[0].stream": '"whatsapp"'}
NATS = {"targets[0].kind": '"nats"', "targets[0].subject": '"waba.inbox"'}


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        pytest.param(
            {**REDIS, "targets[0].url": '"https://crm.example/hook"'},
            "<file>: targets[0].url = 'https://crm.example/hook': expected a redis:// or"
            " rediss:// URL with kind = 'redis'",
            id="redis-with-http-url",
        ),
        pytest.param(
            {"targets[0].url": '"redis://127.0.0.1:6379/0"'},
            "<file>: targets[0].url = 'redis://127.0.0.1:6379/0': expected an http:// or"
            " https:// URL",
            id="http-with-redis-url",
        ),
        pytest.param(
            {**NATS, "targets[0].url": '"nats://a:4222,redis://b:6379"'},
            "<file>: targets[0].url = 'nats://a:4222,redis://b:6379': expected a nats:// or"
            " tls:// URL (several separated by commas) with kind = 'nats'",
            id="nats-with-a-foreign-server",
        ),
        pytest.param(
            {"targets[0].kind": '"redis"', "targets[0].url": '"redis://r:6379"'},
            "<file>: targets[0].stream: required key is missing with kind = 'redis'",
            id="redis-without-stream",
        ),
        pytest.param(
            {"targets[0].kind": '"nats"', "targets[0].url": '"nats://n:4222"'},
            "<file>: targets[0].subject: required key is missing with kind = 'nats'",
            id="nats-without-subject",
        ),
        pytest.param(
            {"targets[0].stream": '"s"'},
            "<file>: targets[0].stream = 's': expected no stream with kind = 'http'",
            id="http-with-stream",
        ),
        pytest.param(
            {**NATS, "targets[0].url": '"nats://n:4222"', "targets[0].maxlen": "10"},
            "<file>: targets[0].maxlen = 10: expected no maxlen with kind = 'nats'",
            id="nats-with-maxlen",
        ),
        pytest.param(
            {**REDIS, "targets[0].url": '"redis://r:6379"', "targets[0].maxlen": "0"},
            "<file>: targets[0].maxlen = 0: expected an integer >= 1",
            id="maxlen-zero",
        ),
        pytest.param(
            {"targets[0].kind": '"kafka"'},
            "<file>: targets[0].kind = 'kafka': expected one of 'http', 'redis', 'nats'",
            id="unknown-kind",
        ),
    ],
)
def test_rejects_target_keys_that_do_not_fit_its_kind(
    tmp_path: Path, entries: Entries, message: str
) -> None:
    """Each kind takes its own URL schemes and keys; the message names the key and the kind."""
    assert rejection(tmp_path, {**TARGET, **entries}) == message


def test_broker_url_takes_its_password_from_the_environment_and_never_shows_it(
    tmp_path: Path,
) -> None:
    """A Redis URL's password comes from ${ENV}; repr and messages show it as *** only."""
    entries = {
        **TARGET,
        **REDIS,
        "targets[0].url": '"rediss://:${REDIS_PASSWORD}@cache.internal:6380/2"',
        "targets[0].maxlen": "100000",
    }
    config = load(tmp_path, entries, {"REDIS_PASSWORD": SECRET})
    (target,) = config.targets
    assert target.url == f"rediss://:{SECRET}@cache.internal:6380/2"
    assert (target.kind, target.stream, target.maxlen) == ("redis", "whatsapp", 100000)
    assert SECRET not in repr(target)
    bad = {**entries, "targets[0].url": '"nats://:${REDIS_PASSWORD}@cache.internal:6380"'}
    message = rejection(tmp_path, bad, {"REDIS_PASSWORD": SECRET})
    assert SECRET not in message
    assert "'nats://:${REDIS_PASSWORD}@cache.internal:6380'" in message


def test_every_user_info_of_several_nats_servers_is_hidden() -> None:
    """repr shows each server of a NATS URL list, each one's user info as ***."""
    target = TargetConfig(
        name="bus", kind="nats", url="nats://u:pw1@a:4222,nats://u:pw2@b:4222", subject="x"
    )
    assert "nats://***@a:4222,nats://***@b:4222" in repr(target)
    assert "pw1" not in repr(target)
    assert "pw2" not in repr(target)


TOKEN = "S3cr3tT0kenXYZ"


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        pytest.param(
            {**NATS, "targets[0].url": f'"nats://{TOKEN}@nats-1:4222,nats-2:4222"'},
            "<file>: targets[0].url = 'nats://***@nats-1:4222,nats-2:4222': expected a nats://"
            " or tls:// URL (several separated by commas) with kind = 'nats'",
            id="nats-token-in-a-server-list-missing-a-scheme",
        ),
        pytest.param(
            {
                **NATS,
                "targets[0].url": f'"tls://{TOKEN}@nats-1:4222,nats://nats-2:4222"',
                "targets[0].ca_file": '"ca"',
            },
            "<file>: targets[0].ca_file = '<dir>/ca': expected no TLS file for a nats:// server"
            " (targets[0].url = 'tls://***@nats-1:4222,nats://nats-2:4222')",
            id="nats-token-beside-a-tls-file",
        ),
        pytest.param(
            {
                **NATS,
                "targets[0].url": f'"nats://gw:pa55,{TOKEN}@127.0.0.1:4222"',
                "targets[0].cert_file": '"client.pem"',
            },
            "<file>: targets[0].cert_file = '<dir>/client.pem': expected no TLS file for a"
            " nats:// target (targets[0].url = 'nats://***@127.0.0.1:4222')",
            id="nats-password-holding-a-comma",
        ),
        pytest.param(
            {**REDIS, "targets[0].url": f'"redis://:pa55#{TOKEN}@127.0.0.1:6379/0"'},
            "<file>: targets[0].url = 'redis://***@127.0.0.1:6379/0': expected a redis:// or"
            " rediss:// URL with kind = 'redis'",
            id="redis-password-holding-a-hash",
        ),
        pytest.param(
            {**REDIS, "targets[0].url": f'"rediss://gw:pa55/{TOKEN}@cache:6380/0"'},
            "<file>: targets[0].url = 'rediss://***@cache:6380/0': expected a redis:// or"
            " rediss:// URL with kind = 'redis'",
            id="redis-password-holding-a-slash",
        ),
        pytest.param(
            {
                **TARGET,
                "targets[0].url": f'"http://crm:pa55?{TOKEN}@crm.example/hook"',
                "targets[0].ca_file": '"ca"',
            },
            "<file>: targets[0].ca_file = '<dir>/ca': expected no TLS file for an http:// target"
            " (targets[0].url = 'http://***@crm.example/hook')",
            id="http-password-holding-a-question-mark",
        ),
        pytest.param(
            {**NATS, "targets[0].url": f'"nats://{TOKEN}@${{NATS_HOST}}:x"'},
            "<file>: targets[0].url = 'nats://***@${NATS_HOST}:x': expected a nats:// or tls://"
            " URL (several separated by commas) with kind = 'nats'",
            id="written-url-with-a-reference-and-a-literal-token",
        ),
    ],
)
def test_target_url_errors_never_show_its_user_info(
    tmp_path: Path, entries: Entries, message: str
) -> None:
    """A target URL's user info may be the secret itself (a NATS token), or a password holding
    a character that ends a URL's authority ('#', '/', '?') or a comma: messages show none of
    it, and a TLS file refused is said to be so for the URL's own scheme."""
    shown = rejection(tmp_path, {**TARGET, **entries}, {"NATS_HOST": "nats-1"})
    assert TOKEN not in shown
    assert shown.replace(str(tmp_path), "<dir>") == message


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        pytest.param(
            {**NATS, "targets[0].url": f'"nats://{TOKEN}@${{UNSET_HOST}}:4222"'},
            "targets[0].url = 'nats://***@${UNSET_HOST}:4222': environment variable UNSET_HOST"
            " is not set",
            id="target-token-beside-an-unset-variable",
        ),
        pytest.param(
            {"targets[0].url": f'"https://gw:{TOKEN}@crm.example/${{PATH"'},
            "targets[0].url = 'https://***@crm.example/${PATH': expected ${NAME} references,"
            " NAME made of letters, digits and '_'",
            id="target-password-beside-a-malformed-reference",
        ),
        pytest.param(
            {"targets[0].url": '"https://${USER}:${PASSWORD}@${UNSET_HOST}/hook"'},
            "targets[0].url = 'https://${USER}:${PASSWORD}@${UNSET_HOST}/hook': environment"
            " variable USER is not set",
            id="target-user-info-of-references-alone-is-shown",
        ),
        pytest.param(
            {"outbox.url": f'"postgresql://waba:{TOKEN}@${{UNSET_HOST}}:5432/waba"'},
            "outbox.url = 'postgresql://waba:***@${UNSET_HOST}:5432/waba': environment variable"
            " UNSET_HOST is not set",
            id="database-password-beside-an-unset-variable",
        ),
        pytest.param(
            {"outbox.url": f'"postgresql://waba:{TOKEN}@db:${{PORT}}/waba"'},
            "outbox.url = 'postgresql://waba:***@db:${PORT}/waba': expected a postgresql:// URL",
            id="database-password-in-a-url-refused",
        ),
        pytest.param(
            {"outbox.url": '"postgresql://waba:${PG_PASSWORD}@${UNSET_HOST}/waba"'},
            "outbox.url = 'postgresql://waba:${PG_PASSWORD}@${UNSET_HOST}/waba': environment"
            " variable PG_PASSWORD is not set",
            id="database-password-of-a-reference-is-shown",
        ),
        pytest.param(
            {"tracing.endpoint": f'"https://otel:{TOKEN}@${{UNSET_HOST}}:4318"'},
            "tracing.endpoint = 'https://***@${UNSET_HOST}:4318': environment variable"
            " UNSET_HOST is not set",
            id="collector-password-beside-an-unset-variable",
        ),
    ],
)
def test_a_url_written_with_references_never_shows_its_literal_secret(
    tmp_path: Path, entries: Entries, message: str
) -> None:
    """A URL's text as written is shown when a reference in it is unset or malformed, or the
    URL is refused: a password or token written literally beside the references is not."""
    shown = rejection(tmp_path, {**TARGET, **entries}, {"PORT": "x"})
    assert TOKEN not in shown
    assert shown == f"<file>: {message}"


@pytest.mark.parametrize(
    "subject",
    ["waba..events", "waba events", "waba.>", "*", "waba.*.x", ".waba", "waba.", "waba\\tx"],
)
def test_rejects_a_nats_subject_no_message_can_be_published_to(
    tmp_path: Path, subject: str
) -> None:
    """An empty token, white space or a wildcard: JetStream never stores such a message (or the
    server drops the connection), so the file is refused, naming the key."""
    entries = {**TARGET, **NATS, "targets[0].url": '"nats://n:4222"'}
    message = rejection(tmp_path, {**entries, "targets[0].subject": f'"{subject}"'})
    shown = subject.replace("\\t", "\t")
    assert message == (
        f"<file>: targets[0].subject = {shown!r}: expected a NATS subject to publish to:"
        " tokens separated by '.', none empty, without white space or the wildcards '*' and '>'"
    )


@pytest.mark.parametrize("subject", ["waba", "waba.events", "WABA_in-1.$x.é"])
def test_accepts_a_nats_subject_of_plain_tokens(tmp_path: Path, subject: str) -> None:
    entries = {**TARGET, **NATS, "targets[0].url": '"nats://n:4222"'}
    (target,) = load(tmp_path, {**entries, "targets[0].subject": f'"{subject}"'}).targets
    assert target.subject == subject


@pytest.mark.parametrize(
    "url",
    [
        "nats://gw:${PW}@nats-1:4222,nats://nats-2:4222",
        "nats://nats-1:4222,nats://gw:${PW}@nats-2:4222",
        "nats://gw:${PW}@nats-1:4222,nats://gw:${PW}@nats-2:4222",
        "nats://${PW}@nats-1:4222,tls://nats-2:4222",
    ],
)
def test_nats_credentials_may_be_written_once_or_alike_on_every_server(
    tmp_path: Path, url: str
) -> None:
    entries = {**TARGET, **NATS, "targets[0].url": f'"{url}"'}
    (target,) = load(tmp_path, entries, {"PW": SECRET}).targets
    assert target.url == url.replace("${PW}", SECRET)


@pytest.mark.parametrize(
    "url",
    [
        "nats://gw:${PW}@nats-1:4222,nats://gw:other@nats-2:4222",
        "nats://gw:${PW}@nats-1:4222,nats://${PW}@nats-2:4222",
    ],
)
def test_rejects_nats_servers_carrying_different_credentials(tmp_path: Path, url: str) -> None:
    """The gateway sends one set of credentials to whichever server it connects to: which of
    two was meant is a guess."""
    message = rejection(tmp_path, {**TARGET, **NATS, "targets[0].url": f'"{url}"'}, {"PW": SECRET})
    assert message == (
        "<file>: targets[0].url: its servers carry different credentials: write them once, on"
        " one server, and the gateway uses them for every server"
    )


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        pytest.param(
            "?ssl_cert_reqs=required",
            "'ssl_cert_reqs' is an option of rediss:// (TLS) URLs only",
            id="tls-option-on-redis-scheme",
        ),
        pytest.param(
            "?socket_timeout=abc",
            "invalid value for 'socket_timeout' in connection URL",
            id="not-a-number",
        ),
        pytest.param(
            "?sockettimeout=5", "'sockettimeout' is not an option redis-py takes", id="misspelt"
        ),
        pytest.param(
            "?socket_timeout=5&password=${PW}&x=1",
            "'x' is not an option redis-py takes",
            id="password-parameter-hidden",
        ),
    ],
)
def test_rejects_redis_url_options_redis_py_refuses(
    tmp_path: Path, query: str, reason: str
) -> None:
    """Read as redis-py reads them, each option one its connection takes: otherwise every
    connection the sender makes fails."""
    url = f"redis://:${{PW}}@cache:6379/0{query}"
    message = rejection(tmp_path, {**TARGET, **REDIS, "targets[0].url": f'"{url}"'}, {"PW": SECRET})
    shown = f"redis://***@cache:6379/0{query}".replace("${PW}", "***")
    assert message == (
        f"<file>: targets[0].url = {shown!r}: expected a redis:// or rediss:// URL whose"
        f" options redis-py takes: {reason}"
    )


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        pytest.param(
            "?decode_responses=true",
            "'decode_responses' is set by the gateway itself: it reads Redis's replies as bytes",
            id="decode-responses",
        ),
        pytest.param(
            "?decode_responses=false",  # redis-py passes the text on: "false" is true
            "'decode_responses' is set by the gateway itself: it reads Redis's replies as bytes",
            id="decode-responses-false",
        ),
        pytest.param(
            "?protocol=3",
            "'protocol' is set by the gateway itself: it speaks RESP2, where a batch's replies"
            " are exactly the next ones read",
            id="protocol",
        ),
        pytest.param(
            "?client_name=gw&protocol=2",
            "'protocol' is set by the gateway itself: it speaks RESP2, where a batch's replies"
            " are exactly the next ones read",
            id="protocol-beside-an-option-it-takes",
        ),
        pytest.param(
            "?socket_timeout=5",
            "'socket_timeout' is set by the gateway itself: the target's timeout_s bounds each"
            " exchange instead",
            id="socket-timeout",
        ),
        pytest.param(
            "?socket_connect_timeout=2&socket_timeout=5",
            "'socket_connect_timeout' is set by the gateway itself: from the target's timeout_s",
            id="socket-connect-timeout-named-first",
        ),
        pytest.param(
            "?protocol=3&sockettimeout=5",
            "'sockettimeout' is not an option redis-py takes",
            id="an-unknown-option-first",
        ),
    ],
)
def test_rejects_redis_url_options_the_sender_sets_itself(
    tmp_path: Path, query: str, reason: str
) -> None:
    """redis-py lets a URL's options override what the sender passes: one the sender sets
    (replies as bytes, RESP2, its timeouts) is refused in one line naming it, even with the
    sender's own value, rather than replacing the sender's (a probe that calls a stream "not a
    stream", RESP3 pushes among a batch's replies)."""
    url = f"redis://:${{PW}}@cache:6379/0{query}"
    message = rejection(tmp_path, {**TARGET, **REDIS, "targets[0].url": f'"{url}"'}, {"PW": SECRET})
    assert message == (
        f"<file>: targets[0].url = 'redis://***@cache:6379/0{query}': expected a redis:// or"
        f" rediss:// URL whose options redis-py takes: {reason}"
    )
    assert redis_url_refusal(url) == reason


@pytest.mark.parametrize("name", sorted(REDIS_SENDER_OPTIONS))
def test_each_option_the_sender_sets_is_refused_on_rediss_urls_too(name: str) -> None:
    """The refusal does not depend on the scheme: a TLS URL overrides the sender alike."""
    refusal = redis_url_refusal(f"rediss://cache:6380/0?ssl_check_hostname=false&{name}=1")
    assert refusal == f"{name!r} is set by the gateway itself: {REDIS_SENDER_OPTIONS[name]}"


@pytest.mark.parametrize(
    "url",
    [
        "redis://cache:6379/0?socket_keepalive=true&health_check_interval=10&client_name=gw",
        "rediss://cache:6380/0?ssl_cert_reqs=required&ssl_check_hostname=false",
        "redis://cache:6379/0?max_connections=50",
    ],
)
def test_accepts_redis_url_options_redis_py_takes(tmp_path: Path, url: str) -> None:
    (target,) = load(tmp_path, {**TARGET, **REDIS, "targets[0].url": f'"{url}"'}).targets
    assert target.url == url


def test_target_options_are_the_target_settings() -> None:
    """The tests' TargetOptions names every TargetConfig setting but its name, typed alike."""
    settings = typing.get_type_hints(TargetConfig)
    del settings["name"]
    assert typing.get_type_hints(TargetOptions) == settings
