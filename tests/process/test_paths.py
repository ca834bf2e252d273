"""The paths users run, each through a gateway's whole life as a real process.

One worker or several, the SQLite file or a PostgreSQL database, each event loop: start, serve
requests on new connections, reload on SIGHUP, lose nothing acknowledged to a SIGKILL, stop on
SIGTERM. Each combination runs once, as one test, since each costs a few seconds of processes.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
import subprocess
import time
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import pytest
from config_files import listen_port, write_config
from helpers import VERIFY_TOKEN, message_body, meta_signature
from pki import Pki
from processes import kill_group, serving, stop
from sink import DEADLINE_S, Sink

NEW_TOKEN = "token-after-reload"


async def _ask(port: int, context: ssl.SSLContext, method: str, query: str, body: bytes) -> int:
    """One request on a connection of its own (the kernel hands it to any worker)."""
    headers = {"Connection": "close"}
    if body:
        headers |= {"Content-Type": "application/json", "X-Hub-Signature-256": meta_signature(body)}
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            f"https://localhost:{port}/webhook{query}",
            data=body or None,
            headers=headers,
            ssl=context,
            # A hang fails the test; a busy machine's slow handshakes must not.
            timeout=aiohttp.ClientTimeout(total=DEADLINE_S),
        ) as response,
    ):
        await response.read()
        return response.status


async def _posts(port: int, pki: Pki, bodies: list[bytes]) -> list[int]:
    context = pki.client_context("meta")
    return list(await asyncio.gather(*(_ask(port, context, "POST", "", b) for b in bodies)))


async def _handshakes(port: int, pki: Pki, token: str, count: int) -> list[int]:
    query = "?" + urlencode(
        {"hub.mode": "subscribe", "hub.challenge": "7", "hub.verify_token": token}
    )
    context = pki.client_context("meta")
    return list(
        await asyncio.gather(*(_ask(port, context, "GET", query, b"") for _ in range(count)))
    )


async def _until_serving(port: int, pki: Pki, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        if process.poll() is not None:
            raise AssertionError(f"the gateway exited with {process.returncode}")
        try:
            if await _handshakes(port, pki, VERIFY_TOKEN, 1) == [200]:
                return
        except (OSError, aiohttp.ClientError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError("the gateway did not start serving")
        await asyncio.sleep(0.1)


PATHS = [
    pytest.param(1, "sqlite", "asyncio", id="1-worker-sqlite-asyncio"),
    pytest.param(2, "sqlite", "asyncio", id="2-workers-sqlite-asyncio"),
    pytest.param(1, "postgres", "asyncio", id="1-worker-postgres-asyncio"),
    pytest.param(2, "postgres", "asyncio", id="2-workers-postgres-asyncio"),
    pytest.param(1, "sqlite", "uvloop", id="1-worker-sqlite-uvloop"),
    pytest.param(2, "postgres", "uvloop", id="2-workers-postgres-uvloop"),
]


@pytest.mark.parametrize(("workers", "outbox", "loop"), PATHS)
async def test_start_serve_reload_kill_and_stop(
    pki: Pki,
    tmp_path: Path,
    sink: Sink,
    request: pytest.FixtureRequest,
    workers: int,
    outbox: str,
    loop: str,
) -> None:
    """Every request on a new connection is answered 200 and delivered; after SIGHUP every
    worker takes the new verify token; what was acknowledged before a SIGKILL is delivered
    after the restart; SIGTERM ends it with status 0 and no traceback; it ran on the loop
    configured."""
    where = 'path = "outbox.sqlite3"'
    if outbox == "postgres":
        # A short lease: the restarted gateway takes over the killed one's claims after it.
        where = f'url = "{request.getfixturevalue("pg_url")}"\nlease_s = 1.5'
    config = write_config(
        pki, tmp_path, target_url=sink.url("/sink"), workers=workers, outbox=where
    )
    config.write_text(
        config.read_text().replace(
            f"workers = {workers}\n", f'workers = {workers}\nloop = "{loop}"\n'
        )
    )
    port = listen_port(config)

    with serving(config) as gateway:
        await _until_serving(port, pki, gateway)
        served = [message_body(f"served {n}") for n in range(12)]
        assert await _posts(port, pki, served) == [200] * len(served)
        await sink.wait_for(len(served), "/sink")

        text = config.read_text()
        config.write_text(text.replace(f'["{VERIFY_TOKEN}"]', f'["{VERIFY_TOKEN}", "{NEW_TOKEN}"]'))
        gateway.send_signal(signal.SIGHUP)
        # Every worker, whichever takes each of a dozen new connections, answers the new token.
        deadline = time.monotonic() + DEADLINE_S
        while await _handshakes(port, pki, NEW_TOKEN, 12) != [200] * 12:
            assert time.monotonic() < deadline, "not every worker took the reload"
            await asyncio.sleep(0.2)

        await sink.down()
        acknowledged = [message_body(f"acknowledged {n}") for n in range(12)]
        assert await _posts(port, pki, acknowledged) == [200] * len(acknowledged)
        kill_group(gateway)  # SIGKILL to the gateway and every worker
        assert gateway.returncode == -signal.SIGKILL

    await sink.up()
    with serving(config) as gateway:
        await _until_serving(port, pki, gateway)
        await sink.wait_for(len(served) + len(acknowledged), "/sink")
        delivered = {r.body for r in sink.received}
        assert set(acknowledged) <= delivered
        output = await asyncio.to_thread(stop, gateway)
        assert gateway.returncode == 0, output
        assert "Traceback" not in output
        assert f"loop={loop}" in output  # each process runs on the loop configured


async def test_sighup_while_workers_start_reaches_every_worker(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """A reload asked for while the workers are still starting (the port already takes
    connections, the supervisor bound it) is not lost: once they serve, every worker answers
    the new verify token."""
    config = write_config(pki, tmp_path, target_url=sink.url("/sink"), workers=2)
    port = listen_port(config)
    text = config.read_text()
    with serving(config) as gateway:
        deadline = time.monotonic() + DEADLINE_S
        while True:  # the supervisor's socket: bound before any worker starts
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the port never took connections"
                await asyncio.sleep(0.01)
        config.write_text(text.replace(f'["{VERIFY_TOKEN}"]', f'["{VERIFY_TOKEN}", "{NEW_TOKEN}"]'))
        gateway.send_signal(signal.SIGHUP)
        await _until_serving(port, pki, gateway)
        while await _handshakes(port, pki, NEW_TOKEN, 12) != [200] * 12:
            assert time.monotonic() < deadline, "a worker missed the reload"
            await asyncio.sleep(0.2)
        output = await asyncio.to_thread(stop, gateway)
        assert gateway.returncode == 0, output
