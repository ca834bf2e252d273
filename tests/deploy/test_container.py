"""The container image as shipped: its Python environment, built as deploy/docker/Dockerfile
builds it (the same files, the same install line, its environment variables), serving.

Docker is not needed: the Dockerfile's steps up to its `pip install` are replayed into a
virtual environment, and the gateway then runs from that environment alone (not from this
checkout) with the image's own configuration file, its paths pointed at test certificates.
Installing takes a while (its dependencies are resolved like in the image), so this runs once.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import subprocess
import time
import venv
from pathlib import Path

from config_files import free_port
from helpers import APP_SECRET, VERIFY_TOKEN
from pki import Pki
from sink import DEADLINE_S, Sink

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy/docker/Dockerfile"
INSTALL_TIMEOUT_S = 600
REQUESTS = 40


def _steps() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    return [
        (line.split(None, 1)[0], line.split(None, 1)[1])
        for line in text.splitlines()
        if line.strip() and not line.startswith("#")
    ]


def _build(root: Path) -> Path:
    """Replay the Dockerfile up to its install into ``root``; return the environment's bin/."""
    environment = root / "venv"
    venv.EnvBuilder(with_pip=True).create(environment)
    bin_dir = environment / "bin"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    workdir = root
    build_args: dict[str, str] = {}  # ARG NAME=default: the image as built without --build-arg
    for op, value in _steps():
        if op == "ARG":
            name, _, default = value.partition("=")
            build_args[name.strip()] = default.strip()
        elif op == "ENV":
            for assignment in shlex.split(value):
                name, _, setting = assignment.partition("=")
                # The image keeps no pip cache (a smaller layer); here the cache only saves
                # downloads, and changes nothing that is installed.
                if name != "PIP_NO_CACHE_DIR":
                    env[name] = setting
        elif op == "WORKDIR":
            workdir = root / value.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif op == "COPY":
            *sources, target = value.split()
            destination = workdir / target
            for source in sources:
                found = REPO / source
                if found.is_dir():
                    shutil.copytree(found, destination, dirs_exist_ok=True)
                else:
                    shutil.copy(found, destination)
        elif op == "RUN" and "pip install" in value:
            # The install command itself, before the clean-up that follows it.
            for name, default in build_args.items():
                value = value.replace("${" + name + "}", default)
            install = shlex.split(value.split("&&")[0])
            assert install[:2] == ["pip", "install"], install
            subprocess.run(
                [str(bin_dir / "python"), "-m", *install],
                cwd=workdir,
                env=env,
                check=True,
                capture_output=True,
                timeout=INSTALL_TIMEOUT_S,
            )
            return bin_dir
    raise AssertionError("the Dockerfile has no pip install step")


def _image_config(pki: Pki, folder: Path, sink: Sink) -> tuple[Path, int]:
    """deploy/docker/gateway.toml, its paths, ports and target pointed at this test's."""
    port = free_port()
    text = (REPO / "deploy/docker/gateway.toml").read_text()
    for old, new in {
        "/etc/waba-gateway/tls/tls.crt": str(pki.server_chain_file),
        "/etc/waba-gateway/tls/tls.key": str(pki.server_key_file),
        "/etc/waba-gateway/meta-ca/meta-outbound-api-ca-2025-12.pem": str(pki.client_ca_file),
        "/var/lib/waba-gateway/outbox.sqlite3": str(folder / "outbox.sqlite3"),
        "http://127.0.0.1:9000/whatsapp/webhook": sink.url("/sink"),
        'host = "0.0.0.0"': 'host = "127.0.0.1"',
        "port = 8443": f"port = {port}",
        "port = 8081": f"port = {free_port()}",
    }.items():
        assert old in text, old
        text = text.replace(old, new)
    config = folder / "gateway.toml"
    config.write_text(text)
    return config, port


def _start(bin_dir: Path, config: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(bin_dir / "waba-gateway"), "serve", "--config", str(config)],
        cwd=config.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _run(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )


async def test_the_image_environment_answers_every_request_on_a_new_connection(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """Built as the Dockerfile builds it, the gateway runs from that environment, on the event
    loop the image's configuration names, and answers each of 40 requests on a new TLS
    connection with 200, each delivered."""
    bin_dir = await asyncio.to_thread(_build, tmp_path / "image")
    config, port = _image_config(pki, tmp_path, sink)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {
        "WABA_VERIFY_TOKEN": VERIFY_TOKEN,
        "WABA_APP_SECRET": APP_SECRET,
        "WABA_ADMIN_TOKEN": "container-admin-token",
    }
    where = await asyncio.to_thread(
        _run,
        [str(bin_dir / "python"), "-c", "import gateway; print(gateway.__file__)"],
        tmp_path,
        env,
    )
    assert Path(where.stdout.strip()).is_relative_to(tmp_path / "image")  # not this checkout
    gateway = _start(bin_dir, config, env)
    try:
        once = [
            str(bin_dir / "waba-gateway"),
            "send",
            f"https://localhost:{port}/webhook",
            str(REPO / "examples/messages-text.json"),
            *("--cert", str(pki.client_chain_file), "--key", str(pki.client_key_file)),
            *("--ca-file", str(pki.server_ca_file), "--app-secret", APP_SECRET),
            *("--timeout-s", "3"),
        ]
        # Until it listens: a refused connection fails `send` at once.
        deadline = time.monotonic() + DEADLINE_S
        while (first := await asyncio.to_thread(_run, once, tmp_path, env)).returncode:
            assert gateway.poll() is None, "the gateway exited"
            assert time.monotonic() < deadline, first.stdout + first.stderr
            await asyncio.sleep(0.2)
        send = [*once, "--count", str(REQUESTS), "--concurrency", "4", "--new-connections"]
        send.append("--unique")
        sent = await asyncio.to_thread(_run, send, tmp_path, env)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert f"ok (2xx): {REQUESTS}" in sent.stdout, sent.stdout
        await sink.wait_for(REQUESTS + 1, "/sink")
    finally:
        gateway.terminate()
        output, _ = await asyncio.to_thread(gateway.communicate, timeout=30)
    log = output.decode(errors="replace")
    assert gateway.returncode == 0, log[-3000:]
    assert "loop=uvloop" in log, log[-3000:]  # the image's configuration chooses uvloop
