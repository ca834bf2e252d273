"""`serve --dev` as a newcomer meets it: the configuration it writes for every other command,
the console's URL, samples that are delivered at every try, and a busy port named with the
option that changes it (gateway.runtime.dev, gateway.cli.serve)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from config_files import write_config
from helpers import APP_SECRET
from pki import Pki
from sink import DEADLINE_S

from gateway.config import load_config
from gateway.devfiles import config_path
from gateway.runtime import dev
from gateway.signing import sign


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *argv],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env=os.environ | {"TEST_APP_SECRET": APP_SECRET},
    )


@contextlib.asynccontextmanager
async def _serve_dev(
    dev_dir: Path, *options: str
) -> AsyncIterator[tuple[list[str], asyncio.subprocess.Process]]:
    """``serve --dev`` running; yields the lines it printed up to the console's URL."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "--dev",
        "--dev-dir",
        str(dev_dir),
        *options,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert process.stdout is not None
    lines: list[str] = []
    try:
        while not lines or not lines[-1].startswith("Console: "):
            line = await asyncio.wait_for(process.stdout.readline(), DEADLINE_S)
            assert line, f"serve --dev stopped early after {lines}"
            lines.append(line.decode().rstrip("\n"))
        yield lines, process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), DEADLINE_S)


async def test_dev_mode_prints_a_command_that_delivers(tmp_path: Path) -> None:
    """serve --dev starts with no set-up and a signed sample reaches the printing target."""
    dev_dir = tmp_path / "var" / "dev"
    async with _serve_dev(dev_dir, "--port", "0", "--admin-port", "0") as (lines, process):
        assert process.stdout is not None
        url = lines[0].split()[3]
        assert url.startswith("https://localhost:")
        secrets = json.loads((dev_dir / "secrets.json").read_text())
        sample = (dev_dir / "sample-notification.json").read_bytes()
        context = ssl.create_default_context(cafile=dev_dir / "server-ca.pem")
        context.load_cert_chain(dev_dir / "client.pem", dev_dir / "client.key")
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                url,
                data=sample,
                headers={"X-Hub-Signature-256": sign(secrets["app_secret"], sample)},
                ssl=context,
            ) as response,
        ):
            assert response.status == 200
        deadline = time.monotonic() + DEADLINE_S
        while True:
            line = await asyncio.wait_for(process.stdout.readline(), DEADLINE_S)
            if line.startswith(b"delivered "):
                assert line.rstrip(b"\n").endswith(sample)
                break
            assert line, "the dev gateway stopped before delivering"
            assert time.monotonic() < deadline
    assert process.returncode == 0


@contextlib.contextmanager
def _busy_port() -> Iterator[int]:
    """A loopback port something else listens on."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield int(taken.getsockname()[1])


async def test_serve_dev_writes_its_config_for_every_command_and_ends_with_the_console(
    tmp_path: Path,
) -> None:
    """The last line printed is the console's URL (which answers); the configuration file it
    names has the bound ports, loads, and `check`, `deliveries list`, `reload` and `send` work with
    --dev; two sends of the sample are both delivered."""
    dev_dir = tmp_path / "var" / "dev"
    async with _serve_dev(dev_dir, "--port", "0", "--admin-port", "0") as (lines, process):
        console = lines[-1].removeprefix("Console: ")
        assert console.startswith("http://127.0.0.1:")
        async with aiohttp.ClientSession() as session, session.get(console) as page:
            assert page.status == 200
            assert "Overview" in await page.text()
        written = config_path(dev_dir)
        assert any(str(written) in line for line in lines)
        assert written.stat().st_mode & 0o077 == 0  # it holds the dev secrets
        config = load_config(written)
        assert console == f"http://127.0.0.1:{config.admin.port}/"
        assert config.listen.port != 0
        dev_options = ("--dev", "--dev-dir", str(dev_dir))
        sent = [await asyncio.to_thread(_cli, "send", *dev_options) for _ in range(2)]
        assert [s.returncode for s in sent] == [0, 0], [s.stdout + s.stderr for s in sent]
        assert process.stdout is not None
        delivered = 0
        while delivered < 2:
            line = await asyncio.wait_for(process.stdout.readline(), DEADLINE_S)
            assert line, "the dev gateway stopped before delivering"
            delivered += line.startswith(b"delivered ")
        listed = await asyncio.to_thread(_cli, "deliveries", "list", *dev_options)
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.count(" delivered ") == 2
        checked = await asyncio.to_thread(_cli, "check", *dev_options)
        assert checked.returncode == 0, checked.stderr
        reloaded = await asyncio.to_thread(_cli, "reload", *dev_options)
        assert reloaded.returncode == 0, reloaded.stderr
        assert "until a restart" not in reloaded.stdout  # nothing differs from the file


def test_each_start_gives_the_sample_a_new_message_id(tmp_path: Path) -> None:
    """After a restart the printed curl command sends a body the gateway has not seen."""
    files = dev.ensure_dev_files(tmp_path)[0]
    first = files.sample.read_bytes()
    dev.write_sample(files)
    second = files.sample.read_bytes()
    assert first != second
    assert len(first) == len(second)
    assert dev.ensure_dev_files(tmp_path)[0].sample.read_bytes() == second  # not at each call


def test_a_command_with_dev_before_serve_dev_ran_says_what_to_do(tmp_path: Path) -> None:
    """No dev configuration yet: one line naming the file and `serve --dev`, exit 2."""
    done = _cli("deliveries", "list", "--dev", "--dev-dir", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr == (
        f"error: {tmp_path}/gateway.toml: no dev configuration yet; start"
        " 'waba-gateway serve --dev' first\n"
    )


@pytest.mark.parametrize(
    ("option", "other"), [("--port", "--admin-port"), ("--admin-port", "--port")]
)
def test_serve_dev_on_a_busy_port_names_the_option_to_change(
    tmp_path: Path, option: str, other: str
) -> None:
    """A port in use is one line naming the port and the option, exit 2, no traceback."""
    with _busy_port() as port:
        done = _cli("serve", "--dev", "--dev-dir", str(tmp_path), option, str(port), other, "0")
    assert done.returncode == 2
    assert (
        done.stderr.splitlines()[-1]
        == f"error: port {port} is in use; choose another with {option}"
    )
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_on_a_busy_port_names_the_key_and_the_file(
    pki: Pki, tmp_path: Path, workers: int
) -> None:
    """Without --dev the message names listen.port and the configuration file, for one
    process and for several workers alike."""
    config = write_config(pki, tmp_path, target_url="http://127.0.0.1:9/", workers=workers)
    with _busy_port() as port:
        config.write_text(config.read_text().replace("port = ", f"port = {port}\n#", 1))
        done = _cli("serve", "--config", str(config))
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        f"error: listen.port {port} in {config} is in use by another process (another"
        " gateway?); stop it or choose another port"
    )
    assert "Traceback" not in done.stderr


README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_quick_start_shows_the_lines_serve_dev_ends_with(tmp_path: Path) -> None:
    """The banner's last lines (the configuration and the console's URL) are in the README's
    quick start as serve --dev prints them with its defaults."""
    files, dev_secrets = dev.ensure_dev_files(tmp_path)
    files = dataclasses.replace(files, folder=Path("var/dev"))
    lines = dev.instructions(files, dev_secrets, 8443, "/webhook").splitlines()
    assert lines[-1] == "Console: http://127.0.0.1:8081/"
    quick_start = README.read_text().split("## How the code is laid out")[0]
    assert "\n".join(lines[-3:]) in quick_start


def test_readme_shows_every_console_screenshot() -> None:
    """Each page the browser tests photograph appears in the README."""
    text = README.read_text()
    for name in ("overview", "deliveries", "delivery", "replay-dead", "certificates", "sign-in"):
        assert f"(docs/console/{name}.png)" in text, name
