"""The gateway as an operator runs it: a real process, real signals, a crash, several workers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import pytest
from config_files import free_port, listen_port, write_config
from helpers import APP_SECRET, message_body, metric
from pki import Pki
from processes import post_to, serving, until_listening
from settling import pending_in_sqlite, until_settled
from sink import DEADLINE_S, Sink
from two_workers import post_over_both_workers

from gateway.cli import main
from gateway.config import META_CLIENT_CN
from gateway.runtime.process import YOUNG_COLLECTION_EVERY


async def _exit_code(process: subprocess.Popen[bytes]) -> int:
    return await asyncio.to_thread(process.wait, DEADLINE_S)


async def test_sigkill_after_ack_with_target_down_loses_nothing(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """Acknowledged while the target is down, killed with SIGKILL, restarted: all delivered."""
    config = write_config(pki, tmp_path, target_url=sink.url("/sink"))
    port = listen_port(config)
    await sink.down()
    bodies = [message_body(f"crash test {n} caf\u00e9 \U0001f62e") for n in range(20)]
    with serving(config) as first:
        await until_listening(port, first)
        statuses = await asyncio.gather(*(post_to(port, pki, body) for body in bodies))
        assert statuses == [200] * len(bodies)
        first.send_signal(signal.SIGKILL)
        assert await _exit_code(first) == -signal.SIGKILL
    await sink.up()
    with serving(config) as second:
        await until_listening(port, second)
        received = await sink.wait_for(len(bodies), "/sink")
        assert sorted(r.body for r in received) == sorted(bodies)
        second.send_signal(signal.SIGTERM)
        assert await _exit_code(second) == 0


async def test_sigterm_finishes_and_exits_zero(pki: Pki, tmp_path: Path, sink: Sink) -> None:
    """SIGTERM stops the gateway cleanly with exit status 0 after delivering what it had."""
    config = write_config(pki, tmp_path, target_url=sink.url("/sink"))
    port = listen_port(config)
    with serving(config) as process:
        await until_listening(port, process)
        assert await post_to(port, pki, message_body("before stop")) == 200
        await sink.wait_for(1, "/sink")
        process.send_signal(signal.SIGTERM)
        assert await _exit_code(process) == 0
        assert process.stdout is not None
        assert b"shutting down" in process.stdout.read()


def test_serve_refuses_config_without_app_secret(pki: Pki, tmp_path: Path) -> None:
    """An unset secret variable is a one-line error naming file and key, exit status 2."""
    config = write_config(pki, tmp_path, target_url="http://127.0.0.1:9/x")
    env = {k: v for k, v in os.environ.items() if k != "TEST_APP_SECRET"}
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert "meta.app_secrets[0]" in result.stderr
    assert "TEST_APP_SECRET is not set" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_workers_without_a_writable_temp_folder_is_a_one_line_error(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """workers = 2 needs a metrics folder: if none can be made, say where, exit 2, start nothing."""
    config = write_config(pki, tmp_path, target_url="http://127.0.0.1:9/x", workers=2)
    monkeypatch.setenv("TEST_APP_SECRET", APP_SECRET)

    def refuse(*_args: object, **_kwargs: object) -> str:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    hangup = signal.getsignal(signal.SIGHUP)
    try:
        assert main(["serve", "--config", str(config)]) == 2
    finally:  # serve ignores SIGHUP from its start: not this process, or the gateways it runs
        signal.signal(signal.SIGHUP, hangup)
    err = capsys.readouterr().err
    assert err.startswith("error: cannot make the workers' metrics folder in ")
    assert "Permission denied; point TMPDIR at a writable folder" in err
    assert len(err.strip().splitlines()) == 1


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name, or None once the process is gone."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _children(pid: int) -> dict[int, str]:
    """Child pid -> start time (so a pid reused by another process is not mistaken for it)."""
    found = {}
    for entry in Path("/proc").iterdir():
        fields = _stat(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None and int(fields[1]) == pid:
            found[int(entry.name)] = fields[19]
    return found


def _alive(pid: int, started: str) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z" and fields[19] == started


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_two_workers_share_outbox_without_loss_or_duplicates(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """workers = 2: every notification delivered exactly once; SIGTERM stops every worker."""
    config = write_config(pki, tmp_path, target_url=sink.url("/sink"), workers=2)
    port = listen_port(config)
    with serving(config) as supervisor:
        await until_listening(port, supervisor)
        bodies = await post_over_both_workers(port, pki, supervisor.pid, "worker test", 60)
        received = await sink.wait_for(len(bodies), "/sink")
        outbox = tmp_path / "outbox.sqlite3"
        await until_settled(pending_in_sqlite(outbox), lambda: len(sink.at("/sink")))
        workers = _children(supervisor.pid)
        assert len(workers) >= 2
        supervisor.send_signal(signal.SIGTERM)
        assert await _exit_code(supervisor) == 0
    assert sorted(r.body for r in sink.at("/sink")) == sorted(bodies)
    assert len({r.headers["X-Gateway-Delivery-Id"] for r in received}) == len(bodies)
    # The supervisor joined its workers before exiting; multiprocessing's helper processes
    # notice their parent is gone a moment later.
    deadline = time.monotonic() + DEADLINE_S
    while [p for p, t in workers.items() if _alive(p, t)] and time.monotonic() < deadline:  # noqa: ASYNC110 (no event to wait on: another process)
        await asyncio.sleep(0.05)
    assert not [p for p, t in workers.items() if _alive(p, t)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT spreading")
async def test_two_workers_metrics_count_what_every_worker_accepted(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """workers = 2: worker 0's /metrics sums both workers' counters, not its own alone."""
    admin_port = free_port()
    config = write_config(
        pki, tmp_path, target_url=sink.url("/sink"), workers=2, admin_port=admin_port
    )
    port = listen_port(config)
    # One new connection each, spread over both workers (checked below), so worker 0's own
    # counters alone would fall short of 40.
    with serving(config) as supervisor:
        await until_listening(port, supervisor)
        bodies = await post_over_both_workers(port, pki, supervisor.pid, "metrics test", 40)
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{admin_port}/metrics") as response,
        ):
            text = await response.text()
        supervisor.send_signal(signal.SIGTERM)
        assert await _exit_code(supervisor) == 0
    # Counted before each 200 was sent, so all are in by now.
    assert metric(text, "waba_gateway_notifications_accepted_total") == len(bodies)
    cn = f'waba_gateway_client_connections_total{{cn="{META_CLIENT_CN}"}}'
    assert metric(text, cn) == len(bodies)
    assert metric(text, "waba_gateway_outbox_jobs_total") >= len(bodies)
    # Series an increase() alert watches exist at 0 before their first event, in this mode too.
    assert metric(text, 'waba_gateway_delivery_attempts_total{outcome="dead",target="sink"}') == 0
    assert metric(text, 'waba_gateway_reloads_total{outcome="failure"}') == 0
    # The supervisor removes the folder the workers counted in.
    left = await asyncio.to_thread(
        lambda: list(Path(tempfile.gettempdir()).glob(f"waba-gateway-metrics-{supervisor.pid}-*"))
    )
    assert not left


def _cmdline(pid: int) -> bytes:
    """The command line of ``pid``; empty once it is gone."""
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return b""


def _spawned_workers(pid: int) -> list[int]:
    """The worker processes of supervisor ``pid`` (not multiprocessing's helper processes)."""
    return [child for child in _children(pid) if b"spawn_main" in _cmdline(child)]


def _sigint_disposed(pid: int) -> bool:
    """Whether process ``pid`` has set what SIGINT does (caught or ignored): once Python's own
    startup is past, it raises KeyboardInterrupt wherever the process is, unless ignored."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return False
    masks = dict(line.split(":\t", 1) for line in lines if line.startswith(("SigCgt", "SigIgn")))
    bit = 1 << (signal.SIGINT - 1)
    return any(int(mask, 16) & bit for mask in masks.values())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_two_workers_survive_sighup_to_any_process(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """workers = 2: SIGHUP to the supervisor and to each worker, even while they start, ends
    none of them; they keep serving, SIGTERM still stops them all and the metrics folder is
    removed. (That each reloads: tests/process/test_reload_process.py.)"""
    config = write_config(pki, tmp_path, target_url=sink.url("/sink"), workers=2)
    port = listen_port(config)
    with serving(config) as supervisor:
        await until_listening(port, supervisor)
        # The supervisor binds the port before its workers exist: wait for both.
        deadline = time.monotonic() + DEADLINE_S
        while len(workers := _spawned_workers(supervisor.pid)) < 2:
            assert time.monotonic() < deadline, f"{len(workers)} workers started"
            await asyncio.sleep(0.05)
        assert len(workers) == 2
        for pid in [supervisor.pid, *workers]:
            os.kill(pid, signal.SIGHUP)
        # Both still serving after the SIGHUPs: each takes some of the connections.
        await post_over_both_workers(port, pki, supervisor.pid, "after SIGHUP", 10)
        assert sorted(_spawned_workers(supervisor.pid)) == sorted(workers)
        supervisor.send_signal(signal.SIGTERM)
        assert await _exit_code(supervisor) == 0
    left = await asyncio.to_thread(
        lambda: list(Path(tempfile.gettempdir()).glob(f"waba-gateway-metrics-{supervisor.pid}-*"))
    )
    assert not left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_stop_signal_to_the_whole_group_while_workers_start_exits_zero(
    pki: Pki, tmp_path: Path, sink: Sink, signum: signal.Signals
) -> None:
    """workers = 2: Ctrl-C (SIGINT to the terminal's process group) or systemd's stop
    (SIGTERM to every process of the service) while the workers are still starting ends a
    worker before its handler is in place: the gateway stops as asked, exit 0, no error line
    and no worker's traceback (a KeyboardInterrupt in the middle of its imports)."""
    config = write_config(pki, tmp_path, target_url=sink.url("/sink"), workers=2)
    with serving(config) as supervisor:
        deadline = time.monotonic() + DEADLINE_S
        while len(workers := _spawned_workers(supervisor.pid)) < 2 or not all(
            _sigint_disposed(worker) for worker in workers
        ):
            assert supervisor.poll() is None, f"the gateway exited with {supervisor.returncode}"
            assert time.monotonic() < deadline, f"{len(workers)} workers started"
            await asyncio.sleep(0.005)
        os.killpg(supervisor.pid, signum)  # still importing: neither serves yet
        code = await _exit_code(supervisor)
        assert supervisor.stdout is not None
        output = supervisor.stdout.read().decode(errors="replace")
    assert "started 2 workers" not in output  # the signal did come while they started
    assert [line for line in output.splitlines() if line.startswith("error:")] == []
    assert "Traceback" not in output
    assert code == 0


# A real SIGINT at a set point of `serve`'s start: when its command modules first import the
# runtime package (an import hook sends it, then steps aside; the gateway's code is as shipped).
_CTRL_C_WHILE_IMPORTING = """
import os, signal, sys

class CtrlC:
    def find_spec(self, name, path, target=None):
        if name == "gateway.runtime":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, CtrlC())
from gateway.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_while_the_command_still_imports_is_a_quiet_stop(tmp_path: Path) -> None:
    """Ctrl-C while `serve` still imports its modules (a second on a slow machine) stops the
    command as Ctrl-C does later: exit 130, as a shell reports it, and no traceback."""
    done = subprocess.run(
        [sys.executable, "-c", _CTRL_C_WHILE_IMPORTING, "serve", "--config", "unused.toml"],
        cwd=tmp_path,
        capture_output=True,
        timeout=DEADLINE_S,
        check=False,
    )
    assert "Traceback" not in done.stderr.decode(errors="replace")
    assert (done.returncode, done.stdout) == (130, b"")


def _in_session(session: int) -> list[int]:
    """Live processes of session ``session`` (field 6 of /proc/PID/stat), zombies aside."""
    found = []
    for entry in Path("/proc").iterdir():
        fields = _stat(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None and fields[0] != "Z" and int(fields[3]) == session:
            found.append(int(entry.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("moment", ["one worker spawned", "both workers spawned", "serving"])
async def test_supervisor_killed_while_workers_start_leaves_no_worker_behind(
    pki: Pki, tmp_path: Path, sink: Sink, moment: str
) -> None:
    """SIGKILL to the supervisor at each moment of its workers' start (the first worker
    process exists, both exist, a worker has answered): none of them goes on serving the
    shared socket on its own (each checks its parent once it can be told)."""
    config = write_config(pki, tmp_path, target_url=sink.url("/sink"), workers=2)
    wanted = {"one worker spawned": 1, "both workers spawned": 2, "serving": 1}[moment]
    with serving(config) as supervisor:
        deadline = time.monotonic() + DEADLINE_S
        while len(workers := _spawned_workers(supervisor.pid)) < wanted:
            assert supervisor.poll() is None, f"the gateway exited with {supervisor.returncode}"
            assert time.monotonic() < deadline, f"{len(workers)} workers started"
            await asyncio.sleep(0.005)
        if moment == "serving":
            port = listen_port(config)
            assert await post_to(port, pki, message_body("before the kill"), fresh=True) == 200
            workers = _spawned_workers(supervisor.pid)
        supervisor.kill()
        await _exit_code(supervisor)
        deadline = time.monotonic() + DEADLINE_S
        while left := _in_session(supervisor.pid):
            assert time.monotonic() < deadline, f"left behind: {left}"
            await asyncio.sleep(0.1)


_REPORT_COLLECTOR = """
import gc, os, signal, sys
from pathlib import Path
from gateway.config import load_config
from gateway.runtime.process import serve_process

def ready(gateway):
    print(gc.get_threshold()[0], gc.get_freeze_count(), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

print(gc.get_threshold()[0], gc.get_freeze_count(), flush=True)
serve_process(load_config(Path(sys.argv[1])), on_ready=ready)
"""


def test_a_serving_process_freezes_its_startup_and_collects_young_objects_less_often(
    pki: Pki, tmp_path: Path
) -> None:
    """Once it serves, the process's startup objects are out of the collector's scans and its
    youngest generation waits for YOUNG_COLLECTION_EVERY allocations (Python's 700 before)."""
    config = write_config(pki, tmp_path, target_url=f"http://127.0.0.1:{free_port()}/sink")
    done = subprocess.run(
        [sys.executable, "-c", _REPORT_COLLECTOR, str(config)],
        env=os.environ | {"TEST_APP_SECRET": APP_SECRET},
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        check=True,
    )
    (young_before, frozen_before), (young, frozen) = (
        tuple(map(int, line.split())) for line in done.stdout.splitlines()
    )
    assert (young_before, frozen_before) == (700, 0)
    assert young == YOUNG_COLLECTION_EVERY
    assert frozen > 10_000  # the modules, configuration and application of a started gateway


# Run in a fresh interpreter: the disposition of SIGHUP when the first command module
# (gateway.cli.serve) starts to load, for `waba-gateway ARGS...`.
_SIGHUP_AT_IMPORT = """
import importlib.abc, signal, sys
signal.signal(signal.SIGHUP, signal.SIG_DFL)  # not what the test's process ignores
seen = []
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "gateway.cli.serve" and not seen:
            seen.append(signal.getsignal(signal.SIGHUP))
        return None
sys.meta_path.insert(0, Watch())
from gateway.cli import main
main(sys.argv[1:])
print("ignored" if seen == [signal.SIG_IGN] else "default", file=sys.__stdout__)
"""


@pytest.mark.parametrize(("command", "expected"), [("serve", "ignored"), ("check", "default")])
def test_serve_ignores_sighup_before_its_command_modules_load(
    tmp_path: Path, command: str, expected: str
) -> None:
    """`systemctl reload` right after `systemctl start` (Type=exec) sends SIGHUP while the
    command still imports: `serve` ignores it from its first line, before the command modules
    load (most of its start), until its own handler takes over; another command keeps the
    default, as an interactive command should."""
    missing = tmp_path / "missing.toml"
    done = subprocess.run(
        [sys.executable, "-c", _SIGHUP_AT_IMPORT, command, "--config", str(missing)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.stdout.strip() == expected, done.stderr


def test_worker_zero_asks_only_its_own_supervisor_to_reload_the_others(tmp_path: Path) -> None:
    """Worker 0 asks the supervisor that started it (SIGUSR1) to reload the others, and no
    process that merely is its parent now: after the supervisor's death its parent is init,
    a container's first process or a subreaper, to which SIGUSR1 means something else."""
    trap = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGUSR1, lambda *_: sys.exit(3))\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    bystander = subprocess.Popen([sys.executable, "-c", trap], stdout=subprocess.PIPE, text=True)
    try:
        assert bystander.stdout is not None
        assert bystander.stdout.readline() == "ready\n"
        worker = (
            "import sys\n"
            "from gateway.runtime.workers import _ask_supervisor_to_reload_the_others as ask\n"
            "ask(int(sys.argv[1]))\n"
        )
        # The bystander is not this child's parent (the test is): it must hear nothing.
        subprocess.run(
            [sys.executable, "-c", worker, str(bystander.pid)], check=True, timeout=DEADLINE_S
        )
        with pytest.raises(subprocess.TimeoutExpired):
            bystander.wait(timeout=1)
    finally:
        bystander.kill()
        bystander.communicate()
