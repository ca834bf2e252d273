"""The SQLite outbox: durable acceptance, deduplication, group commit, states (gateway.outbox)."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import OutboxError
from gateway.outbox import Outbox, connect
from gateway.outcome import AttemptResult, DeadLetter, Delivered, RetryAt
from gateway.routing import Route

DAY = 86400.0
SIG = "sha256=" + "0" * 64


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[Outbox]:
    box = Outbox(tmp_path / "outbox.sqlite3", dedup_window_s=7 * DAY)
    yield box
    await box.close()


def _rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def test_accepted_notification_is_committed_before_accept_returns(outbox: Outbox) -> None:
    """Once accept() returns, another connection already sees the notification and deliveries."""
    assert await outbox.accept(b'{"a":1}', SIG, [Route("t1", None), Route("t2", b"{}")], 1000.0)
    assert _rows(outbox.path, "SELECT body FROM notifications") == [(b'{"a":1}',)]
    assert sorted(_rows(outbox.path, "SELECT target, state FROM deliveries")) == [
        ("t1", "pending"),
        ("t2", "pending"),
    ]


def test_outbox_uses_wal_and_full_sync(tmp_path: Path) -> None:
    """The connection runs in WAL mode with synchronous=FULL (2)."""
    conn = connect(tmp_path / "o.sqlite3")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA synchronous").fetchone() == (2,)
    finally:
        conn.close()


async def test_identical_body_inside_window_is_a_duplicate(outbox: Outbox) -> None:
    """The same bytes again within 7 days are acknowledged but not stored again."""
    assert await outbox.accept(b"x", SIG, [Route("t", None)], 1000.0)
    assert not await outbox.accept(b"x", SIG, [Route("t", None)], 1000.0 + 6 * DAY)
    assert await outbox.accept(b"y", SIG, [Route("t", None)], 1000.0 + 6 * DAY)
    assert len(_rows(outbox.path, "SELECT id FROM deliveries")) == 2


async def test_identical_body_after_window_is_new(outbox: Outbox) -> None:
    """Past the deduplication window the same bytes count as a new notification."""
    assert await outbox.accept(b"x", SIG, [Route("t", None)], 1000.0)
    assert await outbox.accept(b"x", SIG, [Route("t", None)], 1000.0 + 8 * DAY)


async def test_concurrent_accepts_all_commit_in_groups(outbox: Outbox) -> None:
    """Hundreds of concurrent accepts each get their answer and all rows are stored."""
    bodies = [f'{{"n":{i}}}'.encode() for i in range(300)]
    results = await asyncio.gather(
        *(outbox.accept(b, SIG, [Route("t", None)], 1.0) for b in bodies)
    )
    assert all(results)
    assert _rows(outbox.path, "SELECT COUNT(*) FROM deliveries") == [(300,)]


async def test_due_returns_oldest_first_and_skips_excluded_and_future(outbox: Outbox) -> None:
    """due() lists pending deliveries whose time has come, oldest first, minus those in flight."""
    for i, when in enumerate([30.0, 10.0, 20.0, 99.0]):
        await outbox.accept(f"b{i}".encode(), SIG, [Route("t", None)], when)
    due = await outbox.due(50.0, {"t": 10})
    assert [d.body for d in due] == [b"b1", b"b2", b"b0"]
    skipped = await outbox.due(50.0, {"t": 10}, exclude={due[0].id})
    assert [d.body for d in skipped] == [b"b2", b"b0"]
    assert [d.body for d in await outbox.due(50.0, {"t": 1})] == [b"b1"]


async def test_delivery_body_is_meta_bytes_or_split_envelope(outbox: Outbox) -> None:
    """A whole-body delivery carries Meta's bytes and signature; a split one its envelope."""
    await outbox.accept(
        b"meta-bytes", SIG, [Route("whole", None), Route("split", b"envelope")], 1.0
    )
    by_target = {d.target: d for d in await outbox.due(2.0, {"whole": 10, "split": 10})}
    assert (by_target["whole"].body, by_target["whole"].split) == (b"meta-bytes", False)
    assert (by_target["split"].body, by_target["split"].split) == (b"envelope", True)
    assert by_target["whole"].signature == SIG


async def test_record_moves_delivery_through_states(outbox: Outbox) -> None:
    """Retry keeps it pending until its time; delivered and dead leave the due list."""
    await outbox.accept(b"a", SIG, [Route("t", None)], 1.0)
    (delivery,) = await outbox.due(1.0, {"t": 10})
    await outbox.record(delivery.id, RetryAt(50.0, "HTTP 500"), AttemptResult(status=500), 2.0)
    assert await outbox.due(10.0, {"t": 10}) == []
    (again,) = await outbox.due(50.0, {"t": 10})
    assert (again.attempts, again.last_status, again.last_error) == (1, 500, "HTTP 500")
    await outbox.record(
        delivery.id,
        DeadLetter("HTTP 400: not retryable"),
        AttemptResult(status=400, response_excerpt="bad field"),
        51.0,
    )
    (dead,) = await outbox.query(state="dead")
    assert (dead.attempts, dead.last_response, dead.last_error) == (
        2,
        "bad field",
        "HTTP 400: not retryable",
    )
    assert await outbox.counts() == {"pending": 0, "delivered": 0, "dead": 1}


async def test_replay_makes_dead_letter_pending_with_fresh_age(outbox: Outbox) -> None:
    """replay() resets state, attempts and age so the dispatcher sends it again now."""
    await outbox.accept(b"a", SIG, [Route("t", None)], 1.0)
    (delivery,) = await outbox.due(1.0, {"t": 10})
    await outbox.record(delivery.id, DeadLetter("x"), AttemptResult(status=400), 2.0)
    assert await outbox.replay(delivery.id, 500.0)
    (pending,) = await outbox.due(500.0, {"t": 10})
    assert (pending.id, pending.attempts, pending.created_at) == (delivery.id, 0, 500.0)
    assert not await outbox.replay("no-such-id", 500.0)


async def test_prune_removes_old_delivered_keeps_dead_and_pending(outbox: Outbox) -> None:
    """Retention removes delivered rows only; dead letters stay until replayed."""
    for body in (b"delivered", b"dead", b"pending"):
        await outbox.accept(body, SIG, [Route("t", None)], 1.0)
    deliveries = {d.body: d for d in await outbox.due(1.0, {"t": 10})}
    await outbox.record(deliveries[b"delivered"].id, Delivered(), AttemptResult(status=200), 2.0)
    await outbox.record(deliveries[b"dead"].id, DeadLetter("x"), AttemptResult(status=400), 2.0)
    assert await outbox.prune(2.0 + 8 * DAY, 7 * DAY, ["t"]) == 1
    assert sorted(d.body for d in await outbox.query()) == [b"dead", b"pending"]
    assert _rows(outbox.path, "SELECT COUNT(*) FROM notifications") == [(2,)]


def test_unopenable_path_fails_at_start_naming_the_key(tmp_path: Path) -> None:
    """An outbox path that cannot be created raises OutboxError naming outbox.path."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutboxError, match=r"outbox\.path"):
        Outbox(blocker / "outbox.sqlite3", dedup_window_s=DAY)


async def test_closed_outbox_refuses_writes(tmp_path: Path) -> None:
    """After close() every write raises OutboxError (the handler answers 503)."""
    box = Outbox(tmp_path / "o.sqlite3", dedup_window_s=DAY)
    await box.close()
    with pytest.raises(OutboxError):
        await box.accept(b"a", SIG, [], 1.0)


async def test_failed_write_does_not_spoil_the_rest_of_its_group(outbox: Outbox) -> None:
    """One job failing inside a group commit fails alone; its neighbours commit."""

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO no_such_table VALUES (1)")

    results = await asyncio.gather(
        outbox.accept(b"one", SIG, [Route("t", None)], 1.0),
        outbox.run(broken),
        outbox.accept(b"two", SIG, [Route("t", None)], 1.0),
        return_exceptions=True,
    )
    assert isinstance(results[0], list)
    assert isinstance(results[2], list)
    assert isinstance(results[1], OutboxError)
    assert _rows(outbox.path, "SELECT COUNT(*) FROM notifications") == [(2,)]


async def test_write_queued_while_closing_is_refused_not_left_waiting(tmp_path: Path) -> None:
    """A write that arrives once close() has begun fails at once instead of hanging."""
    box = Outbox(tmp_path / "o.sqlite3", dedup_window_s=DAY)
    closing = asyncio.create_task(box.close())
    await asyncio.sleep(0)  # close() has started and queued the writer's stop marker
    with pytest.raises(OutboxError, match="closed"):
        await asyncio.wait_for(box.accept(b"late", SIG, [], 1.0), 10)
    await closing


async def test_due_reads_only_the_targets_asked_for(outbox: Outbox) -> None:
    """A paused target's backlog is not read, and cannot crowd the other targets out."""
    for n in range(5):
        await outbox.accept(f"down{n}".encode(), SIG, [Route("down", None)], 1.0)
    await outbox.accept(b"up", SIG, [Route("up", None)], 2.0)
    assert [d.target for d in await outbox.due(5.0, {"up": 1})] == ["up"]
    assert [d.body for d in await outbox.due(5.0, {"down": 2, "up": 5})] == [
        b"down0",
        b"down1",
        b"up",
    ]


async def test_deliveries_of_removed_targets_are_dead_lettered(outbox: Outbox) -> None:
    """Pending deliveries to a target no longer configured become dead letters with a reason."""
    await outbox.accept(b"a", SIG, [Route("kept", None), Route("gone", None)], 1.0)
    assert await outbox.dead_letter_unknown(["kept"], 2.0) == 1
    (dead,) = await outbox.query(state="dead")
    assert (dead.target, dead.last_error) == ("gone", "target 'gone' is no longer configured")
    assert [d.target for d in await outbox.query(state="pending")] == ["kept"]


def _open_and_close(path: Path, ready: Any, go: Any, errors: Any) -> None:
    async def run() -> None:
        box = Outbox(path, dedup_window_s=DAY)
        await box.close()

    ready.put(None)
    go.wait()
    try:
        asyncio.run(run())
    except OutboxError as exc:
        errors.put(str(exc))


def test_processes_opening_a_new_outbox_together_both_succeed(tmp_path: Path) -> None:
    """Workers starting at once on a new file do not lose the race to switch it to WAL."""
    context = multiprocessing.get_context("fork")
    errors = context.Queue()
    for attempt in range(15):
        path = tmp_path / f"o{attempt}.sqlite3"
        ready, go = context.Queue(), context.Event()
        workers = [
            context.Process(target=_open_and_close, args=(path, ready, go, errors))
            for _ in range(2)
        ]
        for worker in workers:
            worker.start()
        for _ in workers:
            ready.get(timeout=30)
        go.set()
        for worker in workers:
            worker.join(30)
            assert worker.exitcode == 0
    assert errors.empty()
