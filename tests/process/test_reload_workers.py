"""workers = 2 and a reload: every worker ends with the same files, and the admin API's answer
says whether the other workers took what worker 0 took (gateway.runtime.gateway)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from config_files import free_port, listen_port, write_config
from helpers import APP_SECRET, message_body, meta_signature
from pki import Pki
from processes import OutputLines, serving, until_listening
from sink import DEADLINE_S
from two_workers import accepted_by_each_worker, post_over_both_workers

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


async def until(predicate: object, what: str) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + DEADLINE_S
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def _listening_inodes(port: int) -> set[str]:
    """The socket inodes listening on TCP ``port`` (state 0A in /proc/net/tcp and tcp6)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                    inodes.add(fields[9])
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                found.add(target[len("socket:[") : -1])
    return found


def workers_of(supervisor: int, admin_port: int) -> tuple[int, int]:
    """Worker 0 (the one listening on ``admin_port``) and the other worker, by pid."""
    workers = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == supervisor and b"spawn_main" in (entry / "cmdline").read_bytes():
                workers.append(int(entry.name))
    assert len(workers) == 2, workers
    admin = _listening_inodes(admin_port)
    (zero,) = [pid for pid in workers if _socket_inodes(pid) & admin]
    (other,) = [pid for pid in workers if pid != zero]
    return zero, other


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """Process ``pid`` stopped (SIGSTOP) until the block ends: it hears signals only then."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


async def admin_reload(admin_port: int) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
        session.post(f"http://127.0.0.1:{admin_port}/admin/reload") as response,
    ):
        return response.status, await response.text()


async def post_signed(port: int, pki: Pki, body: bytes, secret: str) -> int:
    """POST ``body`` signed with ``secret`` on a connection of its own (a session of its own,
    whose closing waits for the connection's TLS close: no socket is left for the garbage
    collector once the test's loop has ended); the status."""
    headers = {
        "Content-Type": "application/json",
        "X-Hub-Signature-256": meta_signature(body, secret),
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"https://localhost:{port}/webhook",
            data=body,
            headers=headers,
            ssl=pki.client_context("meta"),
        ) as response,
    ):
        await response.read()
        return response.status


async def both_workers_accept(port: int, pki: Pki, supervisor: int, secret: str) -> None:
    """Notifications signed with ``secret``, each on a new connection, until both workers have
    accepted some: every one is answered 200, whichever worker takes it."""
    before = accepted_by_each_worker(supervisor)
    deadline = time.monotonic() + DEADLINE_S
    sent = 0
    while True:
        body = message_body(f"signed with {secret} {sent}")
        assert await post_signed(port, pki, body, secret) == 200, f"request {sent}"
        sent += 1
        now = accepted_by_each_worker(supervisor)
        if len([pid for pid in now if now[pid] > before.get(pid, 0)]) == 2:
            return
        assert time.monotonic() < deadline, now


def with_secret(text: str, secret: str) -> str:
    return text.replace("${TEST_APP_SECRET}", secret)


def two_workers(tmp_path: Path, pki: Pki, extra: str = "") -> tuple[Path, int, int]:
    """A configuration for two workers: its path, listen port and admin port."""
    admin_port = free_port()
    config = write_config(
        pki,
        tmp_path,
        target_url="http://127.0.0.1:9/x",
        workers=2,
        admin_port=admin_port,
        extra=extra,
    )
    return config, listen_port(config), admin_port


async def test_files_changed_between_two_workers_reads_end_the_same_in_both(
    pki: Pki, tmp_path: Path
) -> None:
    """The file changes after worker 0 read it and before the other worker does (held here
    by SIGSTOP until then): the other worker refuses files that are not the ones worker 0
    took, worker 0 reads them again, and both end with the newest. The answer is 200 once
    both have it. (Worker 0 kept the second secret, the other worker took the third, and
    the answer said "reloaded" at once.)"""
    config, port, admin_port = two_workers(tmp_path, pki)
    text = config.read_text()
    with serving(config) as process:
        output = OutputLines(process)
        await until_listening(port, process)
        await post_over_both_workers(port, pki, process.pid, "started", 4)
        _, other = workers_of(process.pid, admin_port)
        reloaded = f"reloaded {config}"
        with stopped(other):
            config.write_text(with_secret(text, "the second secret"))
            answer = asyncio.create_task(admin_reload(admin_port))

            async def worker_0_reloaded() -> bool:
                return output.count(reloaded) >= 1

            await until(worker_0_reloaded, "worker 0 to reload")
            config.write_text(with_secret(text, "the third secret"))
        status, body = await answer
        assert status == 200, body
        assert reloaded in body
        await both_workers_accept(port, pki, process.pid, "the third secret")
        for n in range(6):
            old = message_body(f"old {n}")
            assert await post_signed(port, pki, old, "the second secret") == 401
        assert output.holding("the second secret", "the third secret", APP_SECRET) == []


async def test_the_admin_answer_says_when_another_worker_has_not_taken_the_reload(
    pki: Pki, tmp_path: Path
) -> None:
    """The other worker cannot reload (stopped): the answer is 422 and says that worker 0
    reloaded and the other worker has not confirmed it, instead of worker 0's "reloaded"
    alone. The other worker takes the same files once it runs again. (Logged as JSON, at
    debug level: no line holds a secret.)"""
    config, port, admin_port = two_workers(
        tmp_path, pki, extra='\n[log]\nformat = "json"\nlevel = "debug"\n'
    )
    text = config.read_text()
    with serving(config) as process:
        output = OutputLines(process)
        await until_listening(port, process)
        await post_over_both_workers(port, pki, process.pid, "started", 4)
        _, other = workers_of(process.pid, admin_port)
        with stopped(other):
            config.write_text(with_secret(text, "a new secret"))
            status, body = await admin_reload(admin_port)
        assert status == 422, body
        assert f"reloaded {config} in worker 0" in body
        assert "1 other worker has not confirmed it" in body
        await both_workers_accept(port, pki, process.pid, "a new secret")
        assert output.holding("a new secret", APP_SECRET) == []
        assert output.lines
        for line in output.lines:
            assert isinstance(json.loads(line), dict), line
