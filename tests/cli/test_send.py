"""``waba-gateway send``: the pure parts as tables, then the command against the real gateway."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from callbacks import APP_SECRET, gateway_config, refused_url, running_gateway, stored_bodies
from helpers import sink_target
from pki import Pki
from sink import Sink

from gateway.cli import main
from gateway.devfiles import config_path
from gateway.errors import GatewayError
from gateway.onboarding.loadgen import (
    Answer,
    make_unique,
    meta_headers,
    percentile,
    post,
    tally,
)
from gateway.runtime import dev
from gateway.signing import verify_signature

# Meta's escaping ("\u00e9", "\/", a surrogate pair): a re-serialising sender would change it.
PAYLOAD = dev.SAMPLE
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"id":"wamid.HBgL"}', b'{"id":"wamid.run1000007HBgL"}'),
        (b'{"id":"wamid.A","context":{"id":"wamid.B"}}', b'{"id":"wamid.run1000007A","context"'
         b':{"id":"wamid.B"}}'),
    ],
)  # fmt: skip
def test_marks_the_first_wamid_only(body: bytes, expected: bytes) -> None:
    """--unique inserts the run id and number after the first 'wamid.' and nowhere else."""
    assert make_unique(body, "run1", 7) == expected


def test_refuses_unique_for_a_payload_without_wamid() -> None:
    """Management notifications hold no wamid: --unique cannot mark them."""
    with pytest.raises(GatewayError, match="wamid"):
        make_unique(b'{"field":"account_update"}', "run1", 0)


def test_signs_the_exact_bytes_as_meta_does() -> None:
    """The headers carry Meta's content type and a signature the gateway accepts for the bytes."""
    headers = meta_headers(APP_SECRET, PAYLOAD)
    assert headers["Content-Type"] == "application/json"
    verify_signature([APP_SECRET], PAYLOAD, headers["X-Hub-Signature-256"])


@pytest.mark.parametrize(
    ("values", "percent", "expected"),
    [
        ([], 50, 0.0),
        ([5.0], 99, 5.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.0),
        ([1.0, 2.0, 3.0, 4.0], 90, 4.0),
        ([float(n) for n in range(1, 101)], 99, 99.0),
        ([float(n) for n in range(1, 101)], 100, 100.0),
        ([1.0, 2.0], 0, 1.0),
    ],
)
def test_takes_nearest_rank_percentiles(
    values: list[float], percent: float, expected: float
) -> None:
    """Percentiles are values that were measured (nearest rank), never interpolated."""
    assert percentile(values, percent) == expected


def test_tallies_answers_by_kind() -> None:
    """2xx count as ok, duplicates are noted, statuses and failures are errors by kind."""
    answers = [
        Answer(latency_ms=3.0, status=200, first_line="ok"),
        Answer(latency_ms=1.0, status=200, first_line="ok (duplicate)"),
        Answer(latency_ms=2.0, status=401, first_line="X-Hub-Signature-256 does not match"),
        Answer(latency_ms=9.0, failure="tls", first_line="expired server certificate: ..."),
        Answer(latency_ms=9.0, failure="refused", first_line="connection refused: ..."),
        Answer(latency_ms=4.0, status=401, first_line="X-Hub-Signature-256 does not match"),
    ]
    report = tally(answers, elapsed_s=2.0)
    assert (report.requests, report.ok, report.duplicates) == (6, 2, 1)
    assert report.errors == {"HTTP 401": 2, "TLS": 1, "connection refused": 1}
    assert report.latencies_ms == (1.0, 2.0, 3.0, 4.0)  # failures have no answer to time
    assert report.requests_per_s == 3.0
    summary = report.summary()
    assert summary["latency_ms"] == {"p50": 2.0, "p90": 4.0, "p99": 4.0, "max": 4.0}
    assert "  HTTP 401: 2 (X-Hub-Signature-256 does not match)" in report.lines()


# -- the command against the real gateway -------------------------------------------------------


def meta_options(pki: Pki) -> list[str]:
    return [
        "--cert", str(pki.client_chain_file),
        "--key", str(pki.client_key_file),
        "--ca-file", str(pki.server_ca_file),
    ]  # fmt: skip


async def send(*argv: str) -> int:
    return await asyncio.to_thread(main, ["send", *argv])


@pytest.fixture
def payload(tmp_path: Path) -> Path:
    path = tmp_path / "notification.json"
    path.write_bytes(PAYLOAD)
    return path


async def test_delivers_the_payload_bytes_unchanged(
    pki: Pki, tmp_path: Path, payload: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Meta's chain and the right secret: 200, and the outbox holds the file's exact bytes."""
    async with running_gateway(gateway_config(pki, tmp_path)) as (gateway, url):
        code = await send(url, str(payload), "--app-secret", APP_SECRET, *meta_options(pki))
        stored = await stored_bodies(gateway)
    out = capsys.readouterr().out
    assert code == 0
    assert out == "HTTP 200 OK: ok\n"
    assert stored == [PAYLOAD]
    assert APP_SECRET not in out


async def test_reads_the_app_secret_from_the_environment(
    pki: Pki,
    tmp_path: Path,
    payload: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """WABA_APP_SECRET stands in for --app-secret."""
    monkeypatch.setenv("WABA_APP_SECRET", APP_SECRET)
    async with running_gateway(gateway_config(pki, tmp_path)) as (_, url):
        code = await send(url, str(payload), *meta_options(pki))
    assert code == 0
    assert capsys.readouterr().out.startswith("HTTP 200")


async def test_reports_the_gateway_refusing_a_wrong_secret(
    pki: Pki, tmp_path: Path, payload: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A body signed with another secret gets the gateway's 401, reported with exit 1."""
    async with running_gateway(gateway_config(pki, tmp_path)) as (gateway, url):
        code = await send(url, str(payload), "--app-secret", "wrong-secret", *meta_options(pki))
        stored = await stored_bodies(gateway)
    out = capsys.readouterr().out
    assert code == 1
    assert out == "HTTP 401 Unauthorized: X-Hub-Signature-256 does not match the body\n"
    assert "wrong-secret" not in out
    assert stored == []


async def test_sends_a_non_json_payload_as_it_is_with_a_warning(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not JSON: a warning on stderr, the bytes still sent, and the gateway's 400 reported."""
    path = tmp_path / "broken.json"
    path.write_bytes(b'{"object": "whatsapp_business_account",')
    async with running_gateway(gateway_config(pki, tmp_path)) as (_, url):
        code = await send(url, str(path), "--app-secret", APP_SECRET, *meta_options(pki))
    captured = capsys.readouterr()
    assert code == 1
    assert captured.err.startswith(f"warning: {path} is not valid JSON")
    assert captured.out == "HTTP 400 Bad Request: body is not valid JSON\n"


async def test_load_mode_sends_distinct_bodies_and_reports_percentiles(
    pki: Pki, tmp_path: Path, payload: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--count 50 --concurrency 5 --unique: 50 ok, 50 notifications stored, percentiles shown."""
    async with running_gateway(gateway_config(pki, tmp_path)) as (gateway, url):
        code = await send(
            url, str(payload), "--app-secret", APP_SECRET, *meta_options(pki),
            "--count", "50", "--concurrency", "5", "--unique",
        )  # fmt: skip
        stored = await stored_bodies(gateway)
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert lines[0].startswith("50 requests in ")
    assert lines[0].endswith(" requests/s")
    assert lines[1] == "ok (2xx): 50"
    assert lines[2].startswith("latency ms: p50 ")
    assert " p90 " in lines[2]
    assert " p99 " in lines[2]
    assert lines[3] == "errors: none"
    assert len(set(stored)) == 50


async def test_load_mode_reports_json_over_new_connections(
    pki: Pki, tmp_path: Path, payload: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json --new-connections: one TLS connection per request, the report as JSON."""
    async with running_gateway(gateway_config(pki, tmp_path)) as (_, url):
        code = await send(
            url, str(payload), "--app-secret", APP_SECRET, *meta_options(pki),
            "--count", "10", "--concurrency", "3", "--unique", "--new-connections", "--json",
        )  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert (report["requests"], report["ok"], report["errors"]) == (10, 10, {})
    assert set(report["latency_ms"]) == {"p50", "p90", "p99", "max"}


async def test_load_mode_without_unique_notes_duplicates(
    pki: Pki, tmp_path: Path, payload: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same body five times: all acknowledged, four as duplicates (hence --unique)."""
    async with running_gateway(gateway_config(pki, tmp_path)) as (gateway, url):
        code = await send(
            url, str(payload), "--app-secret", APP_SECRET, *meta_options(pki), "--count", "5"
        )
        stored = await stored_bodies(gateway)
    assert code == 0
    assert "ok (2xx): 5, 4 acknowledged as duplicates" in capsys.readouterr().out
    assert stored == [PAYLOAD]


async def test_load_mode_counts_errors_by_kind(
    pki: Pki, tmp_path: Path, payload: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong secret under load: every request an HTTP 401 error, exit 1."""
    async with running_gateway(gateway_config(pki, tmp_path)) as (_, url):
        code = await send(
            url, str(payload), "--app-secret", "wrong", *meta_options(pki),
            "--count", "6", "--concurrency", "2", "--json",
        )  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    assert (report["ok"], report["errors"]) == (0, {"HTTP 401": 6})


async def test_reports_connection_refused(
    payload: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing listening: the reason in plain words, exit 1; under load, counted by kind."""
    url = refused_url()
    assert await send(url, str(payload), "--app-secret", APP_SECRET) == 1
    assert capsys.readouterr().out.startswith("connection refused: nothing listens on ")
    assert await send(url, str(payload), "--app-secret", APP_SECRET, "--count", "3", "--json") == 1
    assert json.loads(capsys.readouterr().out)["errors"] == {"connection refused": 3}


async def test_reports_untrusted_server_without_its_ca(
    pki: Pki, tmp_path: Path, payload: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --ca-file the system store decides, and it does not know the test server's CA."""
    async with running_gateway(gateway_config(pki, tmp_path)) as (_, url):
        code = await send(
            url, str(payload), "--app-secret", APP_SECRET,
            "--cert", str(pki.client_chain_file), "--key", str(pki.client_key_file),
        )  # fmt: skip
    assert code == 1
    assert capsys.readouterr().out.startswith("untrusted server certificate:")


@pytest.mark.parametrize(
    "argv",
    [
        ["https://127.0.0.1:9/webhook", "missing.json", "--app-secret", "s"],
        ["https://127.0.0.1:9/webhook", ".", "--app-secret", "s"],
        ["https://127.0.0.1:9/webhook"],
        ["https://127.0.0.1:9/webhook", "PAYLOAD", "--count", "0", "--app-secret", "s"],
        ["https://127.0.0.1:9/webhook", "PAYLOAD", "--unique", "--app-secret", "s"],
        ["https://127.0.0.1:9/webhook", "PAYLOAD"],
        ["ftp://127.0.0.1/webhook", "PAYLOAD", "--app-secret", "s"],
        ["https://gw..example.com/webhook", "PAYLOAD", "--app-secret", "s"],
        ["https://" + "a" * 64 + ".example.com/webhook", "PAYLOAD", "--app-secret", "s"],
        ["--dev", "--dev-dir", "no-such-dir"],
    ],
)
def test_refuses_bad_input_with_exit_2(
    argv: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Unreadable payload, missing secret, bad count, --unique without wamid, bad URL (a host
    name with an empty label or one over 63 characters among them): one line, exit 2."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WABA_APP_SECRET", raising=False)
    Path("PAYLOAD").write_bytes(b'{"field": "account_update"}')
    assert main(["send", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ")
    assert captured.err.count("\n") == 1
    assert captured.out == ""


async def test_a_host_the_resolver_cannot_encode_is_an_answer_not_an_exception() -> None:
    """Should such a URL reach the POST without the check, it is a failed answer all the same,
    counted as a connection error in a load report."""
    async with aiohttp.ClientSession() as session:
        answer = await post(
            session, "https://gw..example.com/webhook", PAYLOAD, APP_SECRET, timeout_s=5
        )
    assert answer.first_line.startswith("cannot resolve the host name: ")
    assert tally([answer], 1.0).errors == {"connection": 1}


async def test_gateway_accepts_every_example_payload(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each sample in examples/ goes through as published: signed, stored, 200."""
    samples = sorted(EXAMPLES.glob("*.json"))
    assert samples
    async with running_gateway(gateway_config(pki, tmp_path)) as (gateway, url):
        for sample in samples:
            code = await send(url, str(sample), "--app-secret", APP_SECRET, *meta_options(pki))
            assert code == 0, sample.name
        stored = await stored_bodies(gateway)
    assert capsys.readouterr().out == "HTTP 200 OK: ok\n" * len(samples)
    assert stored == [sample.read_bytes() for sample in samples]


async def test_sends_business_scoped_user_id_samples_forwarded_byte_for_byte(
    pki: Pki, tmp_path: Path, sink: Sink, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each sample of examples/bsuid/ (no phone number of the user; user ids, a username) is
    sent, stored, and forwarded to an ordered target exactly as sent; the new fields route by
    ``fields``."""
    samples = sorted((EXAMPLES / "bsuid").glob("*.json"))
    assert len(samples) >= 7
    targets = [
        sink_target(sink, "ordered", order="conversation"),
        sink_target(sink, "usernames", fields=("business_username_update",)),
    ]
    async with running_gateway(gateway_config(pki, tmp_path, targets=targets)) as (_, url):
        for sample in samples:
            code = await send(url, str(sample), "--app-secret", APP_SECRET, *meta_options(pki))
            assert code == 0, sample.name
        received = await sink.wait_for(len(samples), "/ordered")
        usernames = await sink.wait_for(1, "/usernames")
    assert capsys.readouterr().out == "HTTP 200 OK: ok\n" * len(samples)
    assert sorted(r.body for r in received) == sorted(s.read_bytes() for s in samples)
    username_update = EXAMPLES / "bsuid" / "business_username_update.json"
    assert [r.body for r in usernames] == [username_update.read_bytes()]


# -- --dev --------------------------------------------------------------------------------------


async def test_dev_mode_uses_the_files_of_serve_dev(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--dev finds the certificates, secret and sample that serve --dev made, and makes the
    sample unique at each try, so a second try is stored (and delivered), not a duplicate."""
    files, dev_secrets = dev.ensure_dev_files(tmp_path / "dev")
    config = dev.dev_config(files, dev_secrets, port=0, sink_url="http://127.0.0.1:9/")
    config = dataclasses.replace(config, targets=())
    async with running_gateway(config) as (gateway, _):
        url = f"https://localhost:{gateway.port}/webhook"
        codes = [await send("--dev", "--dev-dir", str(files.folder), url) for _ in range(2)]
        stored = await stored_bodies(gateway)
    assert codes == [0, 0]
    assert capsys.readouterr().out == "HTTP 200 OK: ok\n" * 2
    assert len(set(stored)) == 2
    for body in stored:
        assert b'"id":"wamid.' in body
        assert body.replace(b"wamid.", b"").count(b"DEV") == 1
        assert len(body) > len(dev.SAMPLE)


async def test_dev_mode_sends_to_the_port_serve_dev_wrote(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a URL, --dev reads the dev gateway's port from the configuration it wrote."""
    files, dev_secrets = dev.ensure_dev_files(tmp_path / "dev")
    config = dev.dev_config(files, dev_secrets, port=0, sink_url="http://127.0.0.1:9/")
    config = dataclasses.replace(config, targets=())
    async with running_gateway(config) as (gateway, _):
        written = dataclasses.replace(
            config, listen=dataclasses.replace(config.listen, port=gateway.port)
        )
        config_path(files.folder).write_text(dev.dev_toml(written))
        code = await send("--dev", "--dev-dir", str(files.folder))
        stored = await stored_bodies(gateway)
    assert code == 0
    assert len(stored) == 1


@pytest.mark.parametrize(
    "written",
    ["[listen]\nport = " + "[" * 2000 + "]" * 2000, "listen = 5", '[listen]\nport = "x"'],
    ids=["nested past tomllib's recursion", "listen not a table", "port not a number"],
)
async def test_dev_mode_without_a_url_takes_the_default_port_beside_a_damaged_config(
    tmp_path: Path, written: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The dev gateway's configuration, if not as serve --dev writes it, is as good as none:
    the default port is tried (nothing listens there: an answer, not a traceback)."""
    files, _ = dev.ensure_dev_files(tmp_path / "dev")
    config_path(files.folder).write_text(written)
    code = await send("--dev", "--dev-dir", str(files.folder), "--timeout-s", "2")
    assert code in (0, 1)
    assert "Traceback" not in capsys.readouterr().err


def test_dev_mode_with_damaged_secrets_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A dev secrets file that holds JSON but not an object: one error line, exit 2."""
    files, _ = dev.ensure_dev_files(tmp_path / "dev")
    files.secrets.write_text("[]")
    assert main(["send", "--dev", "--dev-dir", str(files.folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert err.count("\n") == 1


def test_serve_dev_prints_the_send_command_first(tmp_path: Path) -> None:
    """The dev banner's first command is `waba-gateway send --dev`; curl stays the alternative."""
    files, dev_secrets = dev.ensure_dev_files(tmp_path / "dev")
    lines = dev.instructions(files, dev_secrets, 8443, "/webhook").splitlines()
    commands = [line.strip() for line in lines if line.startswith("  ")]
    assert commands[0] == f"waba-gateway send --dev --dev-dir {files.folder}"
    assert commands[1].startswith("curl ")


def test_send_help_runs_as_a_subprocess() -> None:
    """`python -m gateway send --help` works outside the test process."""
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "send", "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "--unique" in result.stdout
    assert "WABA_APP_SECRET" in result.stdout
