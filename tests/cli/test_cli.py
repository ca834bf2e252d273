"""The CLI boundary: `check`, `deliveries`, `reload`, and one-line errors with exit 2."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from aiohttp import web
from config_files import free_port, write_config
from cryptography import x509
from helpers import damage_page
from pki import Pki
from pytest_aiohttp import AiohttpServer

from gateway.cli import main
from gateway.cli.reload import admin_url
from gateway.config import AdminConfig, load_config
from gateway.delivery.outcome import AttemptResult, DeadLetter
from gateway.edge.routing import Route
from gateway.onboarding.check import report
from gateway.outbox import open_outbox
from gateway.outbox.sqlite.outbox import SqliteOutbox

SIG = "sha256=" + "0" * 64


@pytest.fixture
def secret_env() -> Iterator[None]:
    os.environ["TEST_APP_SECRET"] = "cli-test-secret"
    yield
    del os.environ["TEST_APP_SECRET"]


@pytest.fixture
def config(pki: Pki, tmp_path: Path, secret_env: None) -> Path:
    return write_config(pki, tmp_path, target_url="http://127.0.0.1:9/sink")


def test_check_reports_certificates_and_client_ca(
    config: Path, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    """`check` exits 0 and lists expiry, key match, CN and the CA bundle's fingerprints."""
    assert main(["check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "ok: server key matches the certificate" in out
    assert "ok: server certificate" in out
    assert "client.webhooks.fbclientcerts.com" in out
    assert out.count("ok: client CA ") == 1
    assert "sha256 " in out


def test_check_reports_the_sqlite_outbox_and_never_makes_it(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`check` on an outbox file: not there yet (and left so), then its layout, integrity and
    backlog once a gateway has made it, read without changing a byte."""
    path = load_config(config, {"TEST_APP_SECRET": "x"}).outbox.path
    assert main(["check", "--config", str(config)]) == 0
    assert f"ok: outbox file {path} does not exist yet: the first start makes it\n" in (
        capsys.readouterr().out
    )
    assert not path.exists()
    _seed(config)
    before = path.read_bytes()
    assert main(["check", "--config", str(config)]) == 0
    line = f"ok: outbox file {path}: layout 8, intact (quick_check), 1 pending, 1 dead\n"
    assert line in capsys.readouterr().out
    assert path.read_bytes() == before


def test_check_refuses_a_damaged_outbox_file_as_serve_does(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A damaged page: `check` exits 2 with the line `serve` would print."""
    _seed(config)
    path = load_config(config, {"TEST_APP_SECRET": "x"}).outbox.path
    damage_page(path, "deliveries_due")
    assert main(["check", "--config", str(config)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: outbox.path = '{path}' is damaged: ")


def test_check_warns_when_server_certificate_expires_within_30_days(config: Path) -> None:
    """A server certificate with under 30 days left is a warning, not an error."""
    loaded = load_config(config, {"TEST_APP_SECRET": "x"})
    leaf = x509.load_pem_x509_certificates(loaded.tls.cert_file.read_bytes())[0]
    soon = leaf.not_valid_after_utc - datetime.timedelta(days=10)
    lines = report(loaded, soon)
    assert any(line.startswith("warning: server certificate") for line in lines)
    assert all(line.startswith(("ok", "warning")) for line in lines)


def test_check_fails_on_key_that_does_not_match(
    config: Path, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    """A key for another certificate is a one-line error naming the file and tls.key_file."""
    text = config.read_text().replace(str(pki.server_key_file), str(pki.client_key_file))
    config.write_text(text)
    assert main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {config}: tls.key_file")
    assert len(err.strip().splitlines()) == 1


def test_check_fails_on_a_file_name_with_a_nul_byte_in_one_line(
    config: Path, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    """A path TOML can write but no file can have (a NUL byte) is a one-line error naming
    the key, not a traceback."""
    text = config.read_text().replace(str(pki.server_chain_file), "server\\u0000.pem")
    config.write_text(text)
    assert main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "tls.cert_file" in err
    assert len(err.strip().splitlines()) == 1


def test_check_fails_on_expired_server_certificate(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An expired server certificate stops `check` with exit 2, naming the file and the key."""
    ca = trustme.CA()
    leaf = ca.issue_cert(
        "localhost", not_after=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    )
    cert, key = tmp_path / "old.pem", tmp_path / "old.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    lines = config.read_text().splitlines()
    lines = [
        f'cert_file = "{cert}"'
        if x.startswith("cert_file")
        else f'key_file = "{key}"'
        if x.startswith("key_file")
        else x
        for x in lines
    ]
    config.write_text("\n".join(lines))
    assert main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {config}: tls.cert_file = '{cert}': expired on ")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("[meta]", "[meta]\nextra = 1"), "meta.extra"),
        (
            lambda t: t.replace('app_secrets = ["${TEST_APP_SECRET}"]', "app_secrets = []"),
            "meta.app_secrets",
        ),
        (
            lambda t: t.replace("[admin]\nenabled = false", '[admin]\nhost = "0.0.0.0"'),
            "admin.host",
        ),
    ],
    ids=["unknown-key", "no-app-secret", "admin-exposed-without-token"],
)
def test_serve_and_check_refuse_bad_config_with_one_line(
    config: Path, edit: object, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad config: `check` and `serve` both print one `error:` line naming the key, exit 2."""
    assert callable(edit)
    config.write_text(edit(config.read_text()))
    for command in ("check", "serve"):
        assert main([command, "--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {config}: {message}")
        assert len(err.strip().splitlines()) == 1


def test_missing_config_file_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No config file: one line that says where it looked and how to start."""
    assert main(["check", "--config", str(tmp_path / "nope.toml")]) == 2
    err = capsys.readouterr().err
    assert "nope.toml: no such file" in err
    assert "serve --dev" in err


def _seed(config: Path) -> tuple[str, str]:
    """One pending and one dead delivery in the configured outbox; returns their ids."""
    path = load_config(config, {"TEST_APP_SECRET": "x"}).outbox.path

    async def seed() -> tuple[str, str]:
        box = SqliteOutbox(path, dedup_window_s=3600)
        try:
            await box.accept(b'{"n":1}', SIG, [Route("sink", None)], 1.0)
            await box.accept(b'{"n":2}', SIG, [Route("sink", None)], 2.0)
            first, second = await box.due(10.0, {"sink": 10})
            await box.record(
                second.id,
                DeadLetter("HTTP 400: not retryable"),
                AttemptResult(status=400, response_excerpt="no"),
                3.0,
            )
            return first.id, second.id
        finally:
            await box.close()

    return asyncio.run(seed())


def test_deliveries_list_and_replay_work_on_the_outbox_file(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`deliveries list --state dead` shows the dead letter; `replay` makes it pending."""
    pending_id, dead_id = _seed(config)
    assert main(["deliveries", "list", "--config", str(config), "--state", "dead"]) == 0
    out = capsys.readouterr().out
    assert dead_id in out
    assert pending_id not in out
    assert "HTTP 400: not retryable" in out
    assert main(["deliveries", "replay", "--config", str(config), dead_id]) == 0
    assert capsys.readouterr().out == f"replayed {dead_id}\nreplayed 1 deliveries\n"
    assert main(["deliveries", "replay", "--config", str(config), dead_id, "absent-9"]) == 2
    output = capsys.readouterr()
    assert output.out == f"replayed {dead_id}\nreplayed 1 deliveries\n"
    assert output.err == "error: no delivery absent-9\n"
    assert (
        main(["deliveries", "list", "--config", str(config), "--json", "--state", "pending"]) == 0
    )
    listed = json.loads(capsys.readouterr().out)
    assert sorted(d["id"] for d in listed) == sorted([pending_id, dead_id])
    assert all("body" not in d for d in listed)


def test_replay_of_unknown_delivery_is_an_error(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Replaying an id that is not in the outbox exits 2 and names it."""
    _seed(config)
    assert main(["deliveries", "replay", "--config", str(config), "feedface"]) == 2
    assert "no delivery feedface" in capsys.readouterr().err


def test_deliveries_without_outbox_file_is_an_error(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before the gateway ever ran there is no outbox: a clear error, not an empty table."""
    assert main(["deliveries", "list", "--config", str(config)]) == 2
    assert "no outbox file there yet" in capsys.readouterr().err


def test_module_entry_point_runs_as_subprocess() -> None:
    """`python -m gateway --version` works as installed users run it."""
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout.startswith("waba-gateway ")


@pytest.fixture
def pg_config(pki: Pki, tmp_path: Path, secret_env: None, pg_url: str) -> Path:
    return write_config(
        pki, tmp_path, target_url="http://127.0.0.1:9/sink", outbox=f'url = "{pg_url}"'
    )


def test_check_reports_the_database_reachable_and_its_schema_version(
    pg_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With outbox.url, `check` says whether the database answers and at which version."""
    assert main(["check", "--config", str(pg_config)]) == 0
    out = capsys.readouterr().out
    assert "is reachable; its schema is created at the first start" in out
    assert main(["deliveries", "list", "--config", str(pg_config)]) == 2  # no outbox yet
    capsys.readouterr()

    async def first_start() -> None:
        await (await open_outbox(load_config(pg_config).outbox)).close()

    asyncio.run(first_start())
    assert main(["check", "--config", str(pg_config)]) == 0
    assert "is reachable, schema version 7" in capsys.readouterr().out


def test_check_and_serve_with_the_database_down_are_one_line_errors(
    pki: Pki, tmp_path: Path, secret_env: None
) -> None:
    """Nothing listening at outbox.url: `check` and `serve` print one `error:` line, exit 2,
    and the password is not in it."""
    url = "postgresql://waba:${TEST_APP_SECRET}@127.0.0.1:9/waba"
    config = write_config(pki, tmp_path, target_url="http://127.0.0.1:9/s", outbox=f'url = "{url}"')
    for command in ("check", "serve"):
        result = subprocess.run(
            [sys.executable, "-m", "gateway", command, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error: outbox.url = 'postgresql://waba:***@127.0.0.1:9/")
        assert "cannot connect" in result.stderr
        assert "cli-test-secret" not in result.stderr + result.stdout
        assert len(result.stderr.strip().splitlines()) == 1


def test_deliveries_list_and_replay_work_on_the_database(
    pg_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`deliveries list` and `replay` talk to PostgreSQL through the same interface."""

    async def seed() -> str:
        outbox = await open_outbox(load_config(pg_config).outbox)
        try:
            (delivery,) = await outbox.accept(b"{}", SIG, [Route("sink", None)], 1000.0) or []
            await outbox.record_many(
                [(delivery.id, DeadLetter("HTTP 400"), AttemptResult(status=400))], 1001.0
            )
            return delivery.id
        finally:
            await outbox.close()

    delivery_id = asyncio.run(seed())
    assert main(["deliveries", "list", "--config", str(pg_config), "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert (listed["id"], listed["state"], listed["last_status"]) == (delivery_id, "dead", 400)
    assert main(["deliveries", "replay", "--config", str(pg_config), delivery_id]) == 0
    assert f"replayed {delivery_id}" in capsys.readouterr().out
    assert main(["deliveries", "list", "--config", str(pg_config), "--state", "pending"]) == 0
    assert delivery_id in capsys.readouterr().out


def test_deliveries_show_prints_the_last_attempt_and_every_attempts_outcome(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`deliveries show ID`: state, attempts, last status, reason and response, then every
    attempt's outcome; never the body."""
    _, dead_id = _seed(config)
    assert main(["deliveries", "show", "--config", str(config), dead_id]) == 0
    out = capsys.readouterr().out
    facts, _, table = out.partition("\n  #  ")
    (attempt,) = table.splitlines()[1:]
    assert attempt.split()[0] == "1"
    assert "dead" in attempt.split()
    assert "400" in attempt.split()
    fields = dict(line.split(":", 1) for line in facts.splitlines())
    assert {key: value.strip() for key, value in fields.items()} | {
        "received": "",
        "queued": "",
    } == {
        "id": dead_id,
        "target": "sink",
        "state": "dead",
        "received": "",
        "queued": "",
        "attempts": "1",
        "last change": "1970-01-01 00:00:03 UTC",
        "last status": "400",
        "last error": "HTTP 400: not retryable",
        "last response": "no",
        "bytes": "7",
    }
    assert main(["deliveries", "show", "--config", str(config), "feedface"]) == 2
    assert "no delivery feedface" in capsys.readouterr().err


def test_bulk_replay_prints_how_many_it_replayed(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`replay --state dead` with --since (an age or a time) and --target prints a count."""
    _seed(config)
    base = ["deliveries", "replay", "--config", str(config), "--state", "dead"]
    assert main([*base, "--since", "24h"]) == 0  # the dead letter died in 1970
    assert capsys.readouterr().out == "replayed 0 deliveries\n"
    assert main([*base, "--target", "sink", "--since", "1970-01-01T00:00:02Z"]) == 0
    assert capsys.readouterr().out == "replayed 1 deliveries\n"


def test_purge_prints_how_many_dead_letters_it_removed(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`purge --older-than 30d` removes the old dead letter, and only it."""
    pending_id, _ = _seed(config)
    assert main(["deliveries", "purge", "--config", str(config), "--older-than", "30d"]) == 0
    assert capsys.readouterr().out == "purged 1 dead letters\n"
    assert main(["deliveries", "list", "--config", str(config), "--json"]) == 0
    assert [d["id"] for d in json.loads(capsys.readouterr().out)] == [pending_id]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["replay"], "give delivery ids, or --state dead"),
        (["replay", "x-1", "--state", "dead"], "not both"),
        (["replay", "x-1", "--target", "sink"], "--target and --since go with --state"),
        (["replay", "--state", "dead", "--since", "soon"], "--since: 'soon' is neither"),
        (["purge", "--older-than", "a while"], "--older-than: 'a while' is not an age"),
    ],
)
def test_bad_bulk_arguments_are_one_line_errors(
    config: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    """Exit 2 and one line saying what is wrong."""
    _seed(config)
    assert main(["deliveries", args[0], "--config", str(config), *args[1:]]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8081/admin/reload"),
        ("0.0.0.0", "http://127.0.0.1:8081/admin/reload"),
        ("::", "http://[::1]:8081/admin/reload"),
        ("::1", "http://[::1]:8081/admin/reload"),
        ("localhost", "http://localhost:8081/admin/reload"),
    ],
)
def test_reload_asks_the_admin_listener_where_it_listens(host: str, url: str) -> None:
    """An "any address" listener is asked on loopback; IPv6 addresses are bracketed."""
    assert admin_url(AdminConfig(host=host, port=8081, token="t"), "/admin/reload") == url


def test_reload_without_a_running_gateway_is_exit_1_in_one_line(
    pki: Pki, tmp_path: Path, secret_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing listens on the admin port: say so, exit 1."""
    port = free_port()
    config = write_config(pki, tmp_path, target_url="http://127.0.0.1:9/x", admin_port=port)
    assert main(["reload", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: cannot reach the gateway's admin listener at http://127.0.0.1:{port}/"
    )
    assert "admin.port changed in the file" in err
    assert "SIGHUP" in err
    assert len(err.splitlines()) == 1


async def test_reload_with_a_token_the_gateway_does_not_hold_yet_says_to_use_sighup(
    pki: Pki,
    tmp_path: Path,
    secret_env: None,
    aiohttp_server: AiohttpServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The file's admin.token rotated before the reload that would apply it: the gateway, still
    holding the old one, answers 401; the command says why and the way that remains (SIGHUP),
    in one line, exit 1."""

    async def answer(_: web.Request) -> web.Response:
        return web.Response(status=401, text="admin token missing or wrong\n")

    app = web.Application()
    app.router.add_post("/admin/reload", answer)
    server = await aiohttp_server(app)
    config = write_config(pki, tmp_path, target_url="http://127.0.0.1:9/x", admin_port=server.port)
    assert await asyncio.to_thread(main, ["reload", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the gateway answered 401: admin token missing or wrong (if")
    assert "admin.token changed in the file" in err
    assert "SIGHUP" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("content_type", "body", "said"),
    [
        pytest.param("application/json", b"[]", "with JSON that is not an object: []", id="array"),
        pytest.param(
            "application/json", b'"busy"', 'with JSON that is not an object: "busy"', id="string"
        ),
        pytest.param("application/json", b"null", "with JSON that is not an object", id="null"),
        pytest.param(
            "application/json", b"<html>\n<b>oops</b>", "with invalid JSON: <html> <b>", id="html"
        ),
        pytest.param("text/plain", b"bad \xff gateway\r\nline two", "502: bad", id="not-utf-8"),
    ],
)
async def test_reload_answer_that_is_not_the_gateway_s_is_exit_1_in_one_line(
    pki: Pki,
    tmp_path: Path,
    secret_env: None,
    aiohttp_server: AiohttpServer,
    capsys: pytest.CaptureFixture[str],
    content_type: str,
    body: bytes,
    said: str,
) -> None:
    """Something else on the admin port (a proxy's error page, another service) answering
    anything but the gateway's JSON object: one line saying what came back, exit 1."""

    async def answer(_: web.Request) -> web.Response:
        return web.Response(status=502, body=body, content_type=content_type)

    app = web.Application()
    app.router.add_post("/admin/reload", answer)
    server = await aiohttp_server(app)
    config = write_config(pki, tmp_path, target_url="http://127.0.0.1:9/x", admin_port=server.port)
    assert await asyncio.to_thread(main, ["reload", "--config", str(config)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: the gateway answered 502")
    assert said in captured.err
    assert captured.err.count("\n") == 1


def test_reload_with_the_admin_listener_off_names_the_key(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """admin.enabled = false: exit 2, and the way that remains (SIGHUP)."""
    assert main(["reload", "--config", str(config)]) == 2
    assert "admin.enabled = false" in capsys.readouterr().err
