"""Faults between processes: a second gateway on the same outbox or port, a busy port, and what
a supervisor killed with SIGKILL leaves behind. Real ``waba-gateway serve`` processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import aiohttp
import pytest
from config_files import free_port, listen_port, write_config
from helpers import (
    APP_SECRET,
    eventually,
    locked_by_another_process,
    message_body,
)
from pki import Pki
from processes import kill_group, post_to, until_listening
from settling import pending_in_sqlite, until_settled
from sink import DEADLINE_S, Sink

_ENV = os.environ | {"TEST_APP_SECRET": APP_SECRET}


def _command(config: Path) -> list[str]:
    return [sys.executable, "-m", "gateway", "serve", "--config", str(config)]


@contextlib.contextmanager
def _running(
    config: Path,
    env: Mapping[str, str] = _ENV,
    wrap: Callable[[list[str]], list[str]] = lambda command: command,
) -> Iterator[subprocess.Popen[bytes]]:
    """``serve`` (``wrap``ped) as a child process, stopped (SIGTERM, then SIGKILL) at the end."""
    process = subprocess.Popen(
        wrap(_command(config)),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # so that kill_group reaches the workers too
    )
    try:
        yield process
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=DEADLINE_S)
        kill_group(process)


def _pid_no_process_has() -> int:
    """A pid above the kernel's ``pid_max``: no process has it, nor ever will. (The pid of a
    process that has exited is not: the kernel hands pids out again, soon where they are few
    and many processes start, and a process that took it meanwhile makes its folder look
    alive.)"""
    return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1


def _refused(config: Path) -> str:
    """``serve`` that must exit on its own with status 2: its one line of standard error."""
    finished = subprocess.run(
        _command(config), env=_ENV, capture_output=True, text=True, timeout=30, check=False
    )
    assert finished.returncode == 2, finished.stderr[-2000:]
    (line,) = finished.stderr.strip().splitlines()
    return line


def _variant(
    config: Path, folder: Path, *, port: int | None = None, outbox: Path | None = None
) -> Path:
    """A copy of ``config`` in ``folder``, with another port and/or outbox path."""
    folder.mkdir()
    text = config.read_text()
    if port is not None:
        text = re.sub(r"(?m)^port = \d+$", f"port = {port}", text, count=1)
    if outbox is not None:
        text = text.replace('path = "outbox.sqlite3"', f'path = "{outbox}"')
    copy = folder / "gateway.toml"
    copy.write_text(text)
    return copy


async def _serves_once(port: int, pki: Pki, sink: Sink, text: str, outbox: Path) -> None:
    """A valid notification is acknowledged and reaches the sink exactly once (counted once
    ``outbox`` has nothing pending and the sink has been quiet)."""
    before = len(sink.received)
    body = message_body(text)
    assert await post_to(port, pki, body) == 200
    await sink.wait_for(before + 1)
    await until_settled(pending_in_sqlite(outbox), lambda: len(sink.received))
    assert [r.body for r in sink.received[before:]] == [body]


async def test_second_gateway_on_the_same_outbox_is_refused(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """A second ``serve`` on the outbox a running gateway holds exits 2 with one line naming
    the holder, and nothing is dispatched twice."""
    config = write_config(pki, tmp_path, target_url=sink.url("/sink"))
    second = _variant(
        config, tmp_path / "second", port=free_port(), outbox=tmp_path / "outbox.sqlite3"
    )
    with _running(config) as first:
        await until_listening(listen_port(config), first)
        line = await asyncio.to_thread(_refused, second)
        assert line == (
            f"error: outbox.path = '{tmp_path / 'outbox.sqlite3'}' is in use by another gateway"
            f" (pid {first.pid}); stop it first, or give this one an outbox of its own"
        )
        await _serves_once(
            listen_port(config), pki, sink, "one gateway only", tmp_path / "outbox.sqlite3"
        )


@pytest.mark.parametrize(
    "workers",
    [
        pytest.param(1, id="one-worker"),
        # The socket is not SO_REUSEPORT, which would have let the second take a share of the
        # first's connections.
        pytest.param(2, id="multi-worker-gateways-do-not-share-a-port"),
    ],
)
async def test_second_gateway_on_a_busy_port_is_refused_with_one_line(
    pki: Pki, tmp_path: Path, sink: Sink, workers: int
) -> None:
    """A second ``serve`` on a port in use (its own outbox, as many workers) exits 2 with one
    line that names the key and the file, not a traceback; the first keeps serving alone."""
    config = write_config(pki, tmp_path, target_url=sink.url("/sink"), workers=workers)
    port = listen_port(config)
    second = _variant(config, tmp_path / "second")
    with _running(config) as first:
        await until_listening(port, first)
        line = await asyncio.to_thread(_refused, second)
        assert line.startswith(f"error: listen.port {port} in {second} is in use")
        await _serves_once(
            port, pki, sink, f"the first gateway serves on, {workers}", tmp_path / "outbox.sqlite3"
        )


async def test_supervisor_removes_metrics_folders_of_gateways_gone(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """A multi-worker gateway starting removes the metrics folders a supervisor killed with
    SIGKILL left behind, and keeps those of supervisors still running; it serves as usual."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    gone = _pid_no_process_has()
    stale = temporary / f"waba-gateway-metrics-{gone}-left"
    running = temporary / f"waba-gateway-metrics-{os.getpid()}-kept"
    for folder in (stale, running):
        folder.mkdir()
        (folder / "counter_1.db").write_bytes(b"")
    config = write_config(pki, tmp_path, target_url=sink.url("/sink"), workers=2)
    port = listen_port(config)
    with _running(config, env=_ENV | {"TMPDIR": str(temporary)}) as process:
        await until_listening(port, process)
        assert not stale.exists()
        assert running.exists()
        await _serves_once(port, pki, sink, "after the clean-up", tmp_path / "outbox.sqlite3")


def _ignoring_sigxfsz(command: list[str]) -> list[str]:
    """``command`` with SIGXFSZ ignored, so that a write past the file size limit (RLIMIT_FSIZE,
    which binds root too) fails with EFBIG, as on a full disk, instead of killing the process."""
    script = (
        "import os, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "os.execv(sys.argv[1], sys.argv[1:])\n"
    )
    return [sys.executable, "-c", script, *command]


async def _ready(admin_port: int) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{admin_port}/readyz") as response,
    ):
        return response.status


async def test_full_disk_answers_503_and_readyz_says_so_until_space_returns(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """When the outbox's write-ahead log cannot grow (the gateway's file size limit lowered to
    its present size stands in for a full disk), a POST is answered 503, /readyz answers 503 and
    nothing reaches the target; once space returns, both recover."""
    admin_port = free_port()
    config = write_config(pki, tmp_path, target_url=sink.url("/sink"), admin_port=admin_port)
    port = listen_port(config)
    wal = tmp_path / "outbox.sqlite3-wal"
    with _running(config, wrap=_ignoring_sigxfsz) as process:
        await until_listening(port, process)
        await _serves_once(port, pki, sink, "before the disk fills", tmp_path / "outbox.sqlite3")
        full = wal.stat().st_size
        resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (full, resource.RLIM_INFINITY))
        refused = message_body("while the disk is full")
        assert await post_to(port, pki, refused) == 503
        assert await _ready(admin_port) == 503
        resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)

        async def ready_again() -> bool:
            return await _ready(admin_port) == 200

        await eventually(ready_again, "ready once the file may grow")
        await _serves_once(port, pki, sink, "space is back", tmp_path / "outbox.sqlite3")
    assert refused not in {r.body for r in sink.received}


async def test_with_two_workers_a_locked_outbox_answers_each_post_within_the_busy_timeout(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """workers = 2, the outbox locked by another process, /readyz polled: each POST (new
    connections, spread over both workers) is answered 503 within outbox.busy_timeout_s of its
    arrival (and room for a loaded machine), not after the other worker's wait and its own."""
    busy = 2.0
    admin_port = free_port()
    config = write_config(
        pki,
        tmp_path,
        target_url=sink.url("/sink"),
        workers=2,
        admin_port=admin_port,
        outbox=f'path = "outbox.sqlite3"\nbusy_timeout_s = {busy}',
    )
    port = listen_port(config)

    async def timed(delay: float, index: int) -> tuple[int, float]:
        await asyncio.sleep(delay)
        started = time.monotonic()
        status = await post_to(port, pki, message_body(f"locked {index}"))
        return status, time.monotonic() - started

    async def poll_readyz(until: float) -> None:
        while time.monotonic() < until:
            await _ready(admin_port)
            await asyncio.sleep(0.7)

    with _running(config) as process:
        await until_listening(port, process)
        await _serves_once(port, pki, sink, "before the lock", tmp_path / "outbox.sqlite3")
        with locked_by_another_process(tmp_path / "outbox.sqlite3"):
            polling = asyncio.create_task(poll_readyz(time.monotonic() + 2.5 * busy))
            answers = await asyncio.gather(*(timed(0.25 * n, n) for n in range(12)))
            await polling
        assert {status for status, _ in answers} == {503}
        slowest = max(seconds for _, seconds in answers)
        assert slowest < busy + 1.0, f"slowest answer {slowest:.2f}s"
        await _serves_once(port, pki, sink, "after the lock", tmp_path / "outbox.sqlite3")
