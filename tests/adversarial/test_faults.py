"""Faults around the gateway: a target that never answers, an outbox that is locked, full,
removed, damaged or shared, and what is left behind by a crash.

Each case injects the fault for real (a loopback target that hangs, another process holding the
SQLite lock, the file removed from disk, bytes changed in the file) and asserts what the gateway
answers, what reached the targets, and that it still serves a valid request afterwards.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from ci import unavailable
from config_files import write_config
from helpers import (
    APP_SECRET,
    admin_get,
    damage_page,
    eventually,
    gateway_config,
    locked_by_another_process,
    message_body,
    metric,
    post,
    sink_target,
    wait_for_state,
)
from pki import Pki, stale_crl
from settling import pending_in_gateway, until_settled
from sink import Hang, Sink

from gateway.admin.api import READY_WAIT_S
from gateway.config import Config, DispatcherConfig
from gateway.onboarding.check import report
from gateway.onboarding.doctor import diagnose
from gateway.outbox.sqlite.store import DAMAGED
from gateway.runtime.gateway import Gateway
from gateway.runtime.workers import stale_metrics_dirs

# A request to a gateway whose outbox fails is answered within this (the busy timeout below,
# and room for a slow machine); before, it waited as long as the lock was held.
ANSWER_WITHIN_S = 4.0
# What a loaded CI machine may add to a documented bound (TLS handshakes and the event loop
# starved of CPU). The failures these bounds catch are larger: waits added up request after
# request, or a hanging target's whole timeout.
LOADED_MACHINE_S = 2.0


def _config(pki: Pki, tmp_path: Path, sink: Sink) -> Config:
    """One target on ``sink``; the outbox in a folder of its own, with a short busy timeout."""
    config = gateway_config(pki, tmp_path, targets=[sink_target(sink)])
    outbox = dataclasses.replace(
        config.outbox, path=tmp_path / "data" / "outbox.sqlite3", busy_timeout_s=0.5
    )
    return dataclasses.replace(config, outbox=outbox)


async def _serves_a_valid_request(gateway: Gateway, pki: Pki, sink: Sink, text: str) -> None:
    """A valid notification is acknowledged and forwarded, and nothing else reached the sink
    (counted once the outbox has nothing pending and the sink has been quiet)."""
    before = len(sink.received)
    body = message_body(text)
    assert (await post(gateway, pki, body)).status == 200
    await sink.wait_for(before + 1)
    await until_settled(pending_in_gateway(gateway), lambda: len(sink.received))
    assert [r.body for r in sink.received[before:]] == [body]


async def _ready_again(gateway: Gateway, what: str) -> None:
    """Once the admin API's readiness answers 200 again (``what`` names it in a timeout)."""

    async def ready() -> bool:
        return (await admin_get(gateway, "/readyz")).status == 200

    await eventually(ready, what)


# -- a target that never answers ---------------------------------------------------------------


async def test_hanging_target_does_not_delay_another_targets_deliveries(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """With one target that never answers, the other target gets every notification within a
    fraction of the hanging target's ``timeout_s``."""
    async with Sink() as hanging:
        hanging.default = Hang(seconds=30)
        targets = [sink_target(hanging, "hang", timeout_s=10), sink_target(sink, "healthy")]
        config = gateway_config(pki, tmp_path, targets=targets)
        # A small claim budget, so that a few notifications are enough to show the coupling.
        config = dataclasses.replace(
            config, dispatcher=DispatcherConfig(poll_interval_s=0.05, batch_size=16)
        )
        async with Gateway(config) as gateway:
            acked: dict[bytes, float] = {}
            for index in range(40):
                body = message_body(f"isolated {index}")
                assert (await post(gateway, pki, body)).status == 200
                acked[body] = time.monotonic()
            received = await sink.wait_for(40, "/healthy")
            late = [r.at - acked[r.body] for r in received]
            await hanging.down()  # ends the hanging requests before the gateway stops
    # Held back behind the hanging target, a delivery would wait its timeout_s (10 s).
    assert max(late) < 1.0 + LOADED_MACHINE_S, (
        f"slowest delivery to the healthy target: {max(late):.2f}s"
    )


# -- the outbox file ----------------------------------------------------------------------------


async def test_locked_outbox_answers_503_promptly_and_readyz_says_so(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """While another process holds the outbox locked, a POST is answered 503 within the busy
    timeout (not as long as the lock is held), /readyz answers 503, nothing is forwarded; once
    the lock is gone, both recover."""
    config = _config(pki, tmp_path, sink)
    async with Gateway(config) as gateway:
        await _serves_a_valid_request(gateway, pki, sink, "before the lock")
        # Its outcome recorded: else it stays pending through the lock, and is sent again.
        await wait_for_state(gateway, "delivered")
        with locked_by_another_process(config.outbox.path):
            started = time.monotonic()
            async with asyncio.timeout(ANSWER_WITHIN_S):
                answer = await post(gateway, pki, message_body("while locked"))
            assert answer.status == 503
            assert time.monotonic() - started < ANSWER_WITHIN_S
            async with asyncio.timeout(READY_WAIT_S + 2):
                assert (await admin_get(gateway, "/readyz")).status == 503

        await _ready_again(gateway, "ready again once the lock is gone")
        await _serves_a_valid_request(gateway, pki, sink, "after the lock")
    assert b"while locked" not in b"".join(r.body for r in sink.received)


async def test_requests_queued_behind_a_locked_write_wait_no_longer_than_the_busy_timeout(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """Requests that arrive while a write waits on another process's lock are each answered
    503 within the busy timeout of their own arrival, not after the writes queued before them
    have each waited it in turn."""
    config = _config(pki, tmp_path, sink)
    busy = 1.0
    config = dataclasses.replace(
        config, outbox=dataclasses.replace(config.outbox, busy_timeout_s=busy)
    )

    async def timed(index: int) -> tuple[int, float]:
        await asyncio.sleep(index * 0.1)
        started = time.monotonic()
        answer = await post(gateway, pki, message_body(f"queued {index}"))
        return answer.status, time.monotonic() - started

    async with Gateway(config) as gateway:
        await _serves_a_valid_request(gateway, pki, sink, "before the lock")
        await wait_for_state(gateway, "delivered")
        with locked_by_another_process(config.outbox.path):
            answers = await asyncio.gather(*(timed(index) for index in range(20)))
        assert {status for status, _ in answers} == {503}
        slowest = max(seconds for _, seconds in answers)
        # README (Faults): at most outbox.busy_timeout_s from its arrival. Waits added up in
        # turn would take the 20th request about 20 s.
        assert slowest < busy + LOADED_MACHINE_S, f"slowest answer {slowest:.2f}s"

        await _ready_again(gateway, "ready again once the lock is gone")
        await _serves_a_valid_request(gateway, pki, sink, "after the lock")
    assert b"queued" not in b"".join(r.body for r in sink.received)


@contextmanager
def _immutable(*paths: Path) -> Iterator[None]:
    """``chattr +i`` on ``paths`` (no write reaches them, even as root), undone at the end."""
    chattr = shutil.which("chattr")
    if chattr is None:
        unavailable("chattr is not installed: apt-get install e2fsprogs (.ci/run installs it)")
    try:
        subprocess.run([chattr, "+i", *map(str, paths)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        # Installed but refused: the capability (CAP_LINUX_IMMUTABLE) or the filesystem.
        unavailable(f"chattr +i is refused here (CAP_LINUX_IMMUTABLE, filesystem): {exc}")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", *map(str, paths)], check=True)


@pytest.mark.parametrize(
    "suffixes",
    [("", "-wal"), ("-shm",), ("", "-wal", "-shm")],
    ids=["file-and-wal", "shm", "all"],
)
async def test_immutable_outbox_answers_503_and_readyz_says_so(
    pki: Pki, tmp_path: Path, sink: Sink, suffixes: tuple[str, ...]
) -> None:
    """With the outbox's files (the database and its log, or its shared-memory index alone)
    made immutable while the gateway runs, a POST is answered 503, /readyz answers 503 and
    nothing is forwarded; writable again, both recover."""
    config = _config(pki, tmp_path, sink)
    path = config.outbox.path
    async with Gateway(config) as gateway:
        await _serves_a_valid_request(gateway, pki, sink, "before chattr")
        await wait_for_state(gateway, "delivered")
        with _immutable(*(path.with_name(path.name + suffix) for suffix in suffixes)):
            assert (await post(gateway, pki, message_body("immutable"))).status == 503
            assert (await admin_get(gateway, "/readyz")).status == 503

        await _ready_again(gateway, "ready again once writable")
        await _serves_a_valid_request(gateway, pki, sink, "after chattr")
    assert b"immutable" not in b"".join(r.body for r in sink.received)


async def test_removed_outbox_folder_stops_acknowledgements(
    pki: Pki, tmp_path: Path, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    """Once the outbox's folder is removed, POSTs are answered 503 rather than 200 (their
    notifications would be gone after a restart), /readyz answers 503, and one error line says
    why; a restart on a new file serves again."""
    config = _config(pki, tmp_path, sink)
    async with Gateway(config) as gateway:
        await _serves_a_valid_request(gateway, pki, sink, "before removal")
        await wait_for_state(gateway, "delivered")
        shutil.rmtree(config.outbox.path.parent)
        with caplog.at_level(logging.ERROR, logger="gateway.outbox"):
            assert (await post(gateway, pki, message_body("after removal"))).status == 503
            assert (await post(gateway, pki, message_body("again"))).status == 503
            assert (await admin_get(gateway, "/readyz")).status == 503
        lines = [r.getMessage() for r in caplog.records if r.name.startswith("gateway.outbox")]
        assert len(lines) == 1
        assert "removed or replaced" in lines[0]
    assert len(sink.received) == 1
    async with Gateway(config) as gateway:
        await _serves_a_valid_request(gateway, pki, sink, "after a restart")


async def test_a_removed_write_ahead_log_stops_acknowledgements_and_a_stop_keeps_what_it_held(
    pki: Pki, tmp_path: Path, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    """Once the outbox's log (``-wal``) is removed, SQLite writes on to the removed file, which
    a crash would lose: POSTs are answered 503 rather than 200, /readyz answers 503, and one
    error line names the log. What was acknowledged before is still there after a stop (its
    closing checkpoint copies the log into the file) and a restart serves again. (The gateway
    used to go on acknowledging into the removed log.)"""
    config = _config(pki, tmp_path, sink)
    path = config.outbox.path
    async with Gateway(config) as gateway:
        await _serves_a_valid_request(gateway, pki, sink, "before removal")
        await wait_for_state(gateway, "delivered")
        os.remove(f"{path}-wal")
        with caplog.at_level(logging.ERROR, logger="gateway.outbox"):
            assert (await post(gateway, pki, message_body("log removed"))).status == 503
            assert (await admin_get(gateway, "/readyz")).status == 503
        lines = [r.getMessage() for r in caplog.records if r.name.startswith("gateway.outbox")]
        assert len(lines) == 1
        assert f"outbox log '{path}-wal' was removed or replaced" in lines[0]
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM notifications").fetchone() == (1,)
    async with Gateway(config) as gateway:
        await _serves_a_valid_request(gateway, pki, sink, "after a restart")
    assert b"log removed" not in b"".join(r.body for r in sink.received)


@pytest.mark.parametrize("moved", [("",), ("", "-wal", "-shm")], ids=["file", "with-wal-shm"])
async def test_outbox_file_moved_away_and_back_serves_again_without_a_restart(
    pki: Pki, tmp_path: Path, sink: Sink, caplog: pytest.LogCaptureFixture, moved: tuple[str, ...]
) -> None:
    """While the outbox file is moved away: 503 and /readyz 503; once it is moved back (the
    same file), /readyz turns 200 and POSTs are acknowledged and forwarded again, by the same
    running gateway, and what was acknowledged before is still in the file."""
    config = _config(pki, tmp_path, sink)
    path = config.outbox.path
    async with Gateway(config) as gateway:
        await _serves_a_valid_request(gateway, pki, sink, "before the move")
        await wait_for_state(gateway, "delivered")
        for suffix in moved:
            os.rename(f"{path}{suffix}", f"{path}.aside{suffix}")
        with caplog.at_level(logging.WARNING, logger="gateway.outbox"):
            assert (await post(gateway, pki, message_body("while away"))).status == 503
            assert (await admin_get(gateway, "/readyz")).status == 503
            for suffix in moved:
                os.rename(f"{path}.aside{suffix}", f"{path}{suffix}")

            await _ready_again(gateway, "ready once the file is back")
            await _serves_a_valid_request(gateway, pki, sink, "after the move back")
        lines = [r.getMessage() for r in caplog.records if r.name.startswith("gateway.outbox")]
        assert len(lines) == 2
        assert "removed or replaced" in lines[0]
        assert "is back at its path" in lines[1]
        await wait_for_state(gateway, "delivered")
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM deliveries").fetchone() == (2,)
    assert b"while away" not in b"".join(r.body for r in sink.received)


async def test_idle_gateway_commits_nothing(pki: Pki, tmp_path: Path, sink: Sink) -> None:
    """With nothing to do, the dispatcher's polls read the outbox without committing."""
    config = _config(pki, tmp_path, sink)
    async with Gateway(config) as gateway:
        await _serves_a_valid_request(gateway, pki, sink, "then idle")
        await wait_for_state(gateway, "delivered")
        await asyncio.sleep(0.1)  # the last outcome's lazy commit

        async def commits() -> float:
            text = (await admin_get(gateway, "/metrics")).text
            return metric(text, "waba_gateway_outbox_commits_total")

        before = await commits()
        await asyncio.sleep(10 * config.dispatcher.poll_interval_s)
        assert await commits() == before


async def _store_pending(config: Config, pki: Pki, sink: Sink, bodies: list[bytes]) -> None:
    """Acknowledge ``bodies`` while the target is down, so they stay pending in the file; the
    gateway then stops, and the file is left checkpointed (no -wal file)."""
    await sink.down()
    async with Gateway(config) as gateway:
        for body in bodies:
            assert (await post(gateway, pki, body)).status == 200
    assert not config.outbox.path.with_name(config.outbox.path.name + "-wal").exists()
    await sink.up()


def _serve(config_file: Path) -> subprocess.CompletedProcess[str]:
    """``waba-gateway serve`` as an operator runs it, expected to exit on its own."""
    env = os.environ | {"TEST_APP_SECRET": APP_SECRET}
    return subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def test_damaged_outbox_page_refuses_to_start_with_one_line(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """A damaged page in the outbox file: ``serve`` refuses to start with one ``error:`` line
    that names the damage and the ways out, and exits 2; with the file moved aside, as that
    line says, the gateway serves again."""
    config = gateway_config(pki, tmp_path, targets=[sink_target(sink)])
    await _store_pending(config, pki, sink, [message_body(f"before damage {i}") for i in range(5)])
    damage_page(config.outbox.path, "deliveries_due")
    config_file = write_config(pki, tmp_path, target_url=sink.url("/sink"))
    finished = await asyncio.to_thread(_serve, config_file)
    assert finished.returncode == 2, finished.stderr[-2000:]
    (line,) = finished.stderr.strip().splitlines()
    assert line.startswith(f"error: outbox.path = '{config.outbox.path}' is damaged: ")
    assert "move it aside" in line
    assert ".recover" in line
    assert sink.received == []
    config.outbox.path.rename(tmp_path / "damaged.sqlite3")
    async with Gateway(config) as gateway:
        await _serves_a_valid_request(gateway, pki, sink, "on a new outbox")


def _change_bytes(path: Path, old: bytes, new: bytes, *, times: int = 1) -> None:
    """Replace ``old`` by ``new`` (as long) where it occurs ``times`` in the file at ``path``."""
    data = path.read_bytes()
    assert data.count(old) == times
    path.write_bytes(data.replace(old, new))


async def test_damaged_body_is_dead_lettered_never_forwarded(
    pki: Pki, tmp_path: Path, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    """A stored body whose bytes changed in the file no longer matches the digest stored with
    it: its delivery is dead-lettered with the reason and a log line, and never forwarded; the
    intact notification beside it is."""
    config = gateway_config(pki, tmp_path, targets=[sink_target(sink)])
    intact, damaged = message_body("intact body"), message_body("damaged body")
    await _store_pending(config, pki, sink, [intact, damaged])
    _change_bytes(config.outbox.path, b"damaged body", b"dAmaged body")
    with caplog.at_level(logging.ERROR, logger="gateway.outbox"):
        async with Gateway(config) as gateway:
            (dead,) = await wait_for_state(gateway, "dead")
            await sink.wait_for(1)
            await _serves_a_valid_request(gateway, pki, sink, "after the damage")
    assert dead.last_error == DAMAGED
    assert b"Amaged" not in b"".join(r.body for r in sink.received)
    assert sink.received[0].body == intact
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("gateway.outbox")]
    assert lines == [f"delivery {dead.id} dead-lettered: {DAMAGED}"]


async def test_damaged_notification_of_a_split_delivery_is_dead_lettered(
    pki: Pki, tmp_path: Path, sink: Sink
) -> None:
    """A split delivery (one change of a notification) is checked against its notification's
    digest: damaged, it is dead-lettered and never forwarded."""
    config = gateway_config(pki, tmp_path, targets=[sink_target(sink, split="change")])
    await _store_pending(config, pki, sink, [message_body("damaged split")])
    # The text is in the notification's body and in the part stored for the split delivery.
    _change_bytes(config.outbox.path, b"damaged split", b"dAmaged split", times=2)
    async with Gateway(config) as gateway:
        (dead,) = await wait_for_state(gateway, "dead")
        await _serves_a_valid_request(gateway, pki, sink, "after the damage")
    assert dead.last_error == DAMAGED
    assert b"Amaged" not in b"".join(r.body for r in sink.received)


# -- what time and crashes leave behind ---------------------------------------------------------


async def test_crl_past_its_next_update_is_warned_at_start_check_and_doctor(
    pki: Pki, tmp_path: Path, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    """A CRL whose next update is past: a warning when the gateway starts, a ``warning:`` line
    in ``check`` and a WARN finding in ``doctor``."""
    crl_file = tmp_path / "stale.crl.pem"
    crl_file.write_bytes(stale_crl(pki.meta_intermediate))
    config = dataclasses.replace(
        gateway_config(pki, tmp_path, targets=[sink_target(sink)]),
        tls=pki.tls_config(crl_file=crl_file),
    )
    expected = f"tls.crl_file = '{crl_file}': the CRL of "
    with caplog.at_level(logging.WARNING, logger="gateway.runtime"):
        async with Gateway(config):
            pass
    assert any(r.getMessage().startswith(expected) for r in caplog.records)
    now = datetime.datetime.now(datetime.UTC)
    assert any(line.startswith(f"warning: {expected}") for line in report(config, now))
    findings = await diagnose(config, now)
    assert any(f.level == "WARN" and f.what.startswith(expected) for f in findings)


@pytest.mark.parametrize(
    ("name", "alive", "stale"),
    [
        pytest.param("waba-gateway-metrics-123-abcd", False, True, id="supervisor gone"),
        pytest.param("waba-gateway-metrics-123-abcd", True, False, id="supervisor running"),
        pytest.param("waba-gateway-metrics-x1-abcd", False, False, id="no pid"),
        pytest.param("waba-gateway-metrics-123", False, False, id="not a folder mkdtemp made"),
        pytest.param("other-123-abcd", False, False, id="not ours"),
    ],
)
def test_stale_metrics_dirs(name: str, alive: bool, stale: bool) -> None:
    """Only the metrics folders of supervisors no longer alive are left-overs."""
    assert stale_metrics_dirs([name], lambda pid: alive) == ([name] if stale else [])
