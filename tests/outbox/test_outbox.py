"""The SQLite outbox: durable acceptance, deduplication, group commit, states (gateway.outbox)."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.delivery.outcome import AttemptResult, DeadLetter, Delivered, RetryAt
from gateway.edge.routing import Route
from gateway.errors import OutboxError
from gateway.outbox import Backlog
from gateway.outbox.sqlite import layout, store
from gateway.outbox.sqlite.layout import connect
from gateway.outbox.sqlite.outbox import SqliteOutbox
from gateway.outbox.sqlite.owner import OwnerLock
from gateway.outbox.sqlite.store import list_deliveries, replay_delivery

DAY = 86400.0
SIG = "sha256=" + "0" * 64


@pytest.fixture
async def counted(tmp_path: Path) -> AsyncIterator[tuple[SqliteOutbox, list[int]]]:
    """An outbox and the size of each group it has committed, in order."""
    groups: list[int] = []
    box = SqliteOutbox(tmp_path / "outbox.sqlite3", dedup_window_s=7 * DAY, on_commit=groups.append)
    yield box, groups
    await box.close()


@pytest.fixture
def outbox(counted: tuple[SqliteOutbox, list[int]]) -> SqliteOutbox:
    return counted[0]


# The first layout, as the previous version created it (user_version left at 0).
_LAYOUT_1 = """
CREATE TABLE notifications (id INTEGER PRIMARY KEY, digest BLOB NOT NULL,
    received_at REAL NOT NULL, signature TEXT NOT NULL, body BLOB NOT NULL);
CREATE INDEX notifications_digest ON notifications (digest, received_at);
CREATE INDEX notifications_received ON notifications (received_at);
CREATE TABLE deliveries (id TEXT PRIMARY KEY,
    notification_id INTEGER NOT NULL REFERENCES notifications (id), target TEXT NOT NULL,
    body BLOB, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL, next_attempt_at REAL NOT NULL, updated_at REAL NOT NULL,
    last_status INTEGER, last_error TEXT, last_response TEXT);
CREATE INDEX deliveries_due ON deliveries (state, target, next_attempt_at);
CREATE INDEX deliveries_notification ON deliveries (notification_id);
INSERT INTO notifications VALUES (1, x'00', 1.0, 'sha256=0', x'7b7d');
INSERT INTO deliveries (id, notification_id, target, state, created_at, next_attempt_at,
    updated_at) VALUES ('0123456789abcdef0123456789abcdef', 1, 't', 'pending', 1.0, 1.0, 1.0);
"""


def _rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def test_accepted_notification_is_committed_before_accept_returns(
    outbox: SqliteOutbox,
) -> None:
    """Once accept() returns, another connection already sees the notification and deliveries."""
    assert await outbox.accept(b'{"a":1}', SIG, [Route("t1", None), Route("t2", b"{}")], 1000.0)
    assert _rows(outbox.path, "SELECT body FROM notifications") == [(b'{"a":1}',)]
    assert sorted(_rows(outbox.path, "SELECT target, state FROM deliveries")) == [
        ("t1", "pending"),
        ("t2", "pending"),
    ]


def test_outbox_uses_wal_full_sync_and_short_checkpoints(tmp_path: Path) -> None:
    """The connection runs in WAL mode with synchronous=FULL (2), and checkpoints every 200
    pages of log rather than SQLite's 1000, so no single commit stalls long on one."""
    conn = connect(tmp_path / "o.sqlite3")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA synchronous").fetchone() == (2,)
        assert conn.execute("PRAGMA wal_autocheckpoint").fetchone() == (200,)
    finally:
        conn.close()


async def test_identical_body_inside_window_is_a_duplicate(outbox: SqliteOutbox) -> None:
    """The same bytes again within 7 days are acknowledged but not stored again."""
    assert await outbox.accept(b"x", SIG, [Route("t", None)], 1000.0)
    assert not await outbox.accept(b"x", SIG, [Route("t", None)], 1000.0 + 6 * DAY)
    assert await outbox.accept(b"y", SIG, [Route("t", None)], 1000.0 + 6 * DAY)
    assert len(_rows(outbox.path, "SELECT id FROM deliveries")) == 2


async def test_identical_body_after_window_is_new(outbox: SqliteOutbox) -> None:
    """Past the deduplication window the same bytes count as a new notification."""
    assert await outbox.accept(b"x", SIG, [Route("t", None)], 1000.0)
    assert await outbox.accept(b"x", SIG, [Route("t", None)], 1000.0 + 8 * DAY)


async def test_concurrent_accepts_all_commit_in_groups(outbox: SqliteOutbox) -> None:
    """Hundreds of concurrent accepts each get their answer and all rows are stored."""
    bodies = [f'{{"n":{i}}}'.encode() for i in range(300)]
    results = await asyncio.gather(
        *(outbox.accept(b, SIG, [Route("t", None)], 1.0) for b in bodies)
    )
    assert all(results)
    assert _rows(outbox.path, "SELECT COUNT(*) FROM deliveries") == [(300,)]


async def test_due_returns_oldest_first_and_skips_excluded_and_future(outbox: SqliteOutbox) -> None:
    """due() lists pending deliveries whose time has come, oldest first, minus those in flight."""
    for i, when in enumerate([30.0, 10.0, 20.0, 99.0]):
        await outbox.accept(f"b{i}".encode(), SIG, [Route("t", None)], when)
    due = await outbox.due(50.0, {"t": 10})
    assert [d.body for d in due] == [b"b1", b"b2", b"b0"]
    skipped = await outbox.due(50.0, {"t": 10}, exclude={due[0].id})
    assert [d.body for d in skipped] == [b"b2", b"b0"]
    assert [d.body for d in await outbox.due(50.0, {"t": 1})] == [b"b1"]


async def test_delivery_body_is_meta_bytes_or_split_envelope(outbox: SqliteOutbox) -> None:
    """A whole-body delivery carries Meta's bytes and signature; a split one its envelope."""
    await outbox.accept(
        b"meta-bytes", SIG, [Route("whole", None), Route("split", b"envelope")], 1.0
    )
    by_target = {d.target: d for d in await outbox.due(2.0, {"whole": 10, "split": 10})}
    assert (by_target["whole"].body, by_target["whole"].split) == (b"meta-bytes", False)
    assert (by_target["split"].body, by_target["split"].split) == (b"envelope", True)
    assert by_target["whole"].signature == SIG


async def test_accepts_submitted_in_one_loop_turn_share_one_commit(
    counted: tuple[SqliteOutbox, list[int]],
) -> None:
    """Group commit: what the event loop submits in one turn reaches the writer as one group,
    so 64 concurrent notifications cost one fsync, not 64."""
    outbox, groups = counted
    before = len(groups)
    bodies = [f'{{"turn":{i}}}'.encode() for i in range(64)]
    await asyncio.gather(*(outbox.accept(b, SIG, [Route("t", None)], 1.0) for b in bodies))
    assert len(groups) == before + 1


async def test_attempt_outcome_rides_along_with_the_next_notification(
    counted: tuple[SqliteOutbox, list[int]],
) -> None:
    """An outcome (lazy) and a notification (durable) submitted together: one commit."""
    outbox, groups = counted
    await outbox.accept(b"first", SIG, [Route("t", None)], 1.0)
    (delivery,) = await outbox.due(1.0, {"t": 1})
    before = len(groups)
    await asyncio.gather(
        outbox.record(delivery.id, Delivered(), AttemptResult(status=200), 2.0),
        outbox.accept(b"second", SIG, [Route("t", None)], 2.0),
    )
    assert len(groups) == before + 1
    assert _rows(outbox.path, "SELECT state FROM deliveries ORDER BY id") == [
        ("delivered",),
        ("pending",),
    ]


async def test_attempt_outcome_alone_is_committed_before_record_returns(
    outbox: SqliteOutbox,
) -> None:
    """With no notification to ride along with, an outcome still commits on its own, and
    record() returns only once another connection can see it."""
    await outbox.accept(b"only", SIG, [Route("t", None)], 1.0)
    (delivery,) = await outbox.due(1.0, {"t": 1})
    await outbox.record(delivery.id, Delivered(), AttemptResult(status=200), 2.0)
    assert _rows(outbox.path, "SELECT state, attempts FROM deliveries") == [("delivered", 1)]


async def test_record_moves_delivery_through_states(outbox: SqliteOutbox) -> None:
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


async def test_replay_makes_dead_letter_pending_with_fresh_age(outbox: SqliteOutbox) -> None:
    """replay() resets state, attempts and age so the dispatcher sends it again now."""
    await outbox.accept(b"a", SIG, [Route("t", None)], 1.0)
    (delivery,) = await outbox.due(1.0, {"t": 10})
    await outbox.record(delivery.id, DeadLetter("x"), AttemptResult(status=400), 2.0)
    assert await outbox.replay(delivery.id, 500.0)
    (pending,) = await outbox.due(500.0, {"t": 10})
    assert (pending.id, pending.attempts, pending.created_at) == (delivery.id, 0, 500.0)
    assert not await outbox.replay("no-such-id", 500.0)


async def test_prune_removes_old_delivered_keeps_dead_and_pending(outbox: SqliteOutbox) -> None:
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
        SqliteOutbox(blocker / "outbox.sqlite3", dedup_window_s=DAY)


async def test_closed_outbox_refuses_writes(tmp_path: Path) -> None:
    """After close() every write raises OutboxError (the handler answers 503)."""
    box = SqliteOutbox(tmp_path / "o.sqlite3", dedup_window_s=DAY)
    await box.close()
    with pytest.raises(OutboxError):
        await box.accept(b"a", SIG, [], 1.0)


async def test_failed_write_does_not_spoil_the_rest_of_its_group(outbox: SqliteOutbox) -> None:
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
    box = SqliteOutbox(tmp_path / "o.sqlite3", dedup_window_s=DAY)
    closing = asyncio.create_task(box.close())
    await asyncio.sleep(0)  # close() has started and queued the writer's stop marker
    with pytest.raises(OutboxError, match="closed"):
        await asyncio.wait_for(box.accept(b"late", SIG, [], 1.0), 10)
    await closing


async def test_due_reads_only_the_targets_asked_for(outbox: SqliteOutbox) -> None:
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


async def _dead(outbox: SqliteOutbox, body: bytes, target: str, now: float) -> str:
    (delivery,) = await outbox.accept(body, SIG, [Route(target, None)], now) or []
    await outbox.record(delivery.id, DeadLetter("x"), AttemptResult(status=400), now)
    return delivery.id


async def test_backlog_counts_pending_and_dead_per_target_with_the_oldest_pending(
    outbox: SqliteOutbox,
) -> None:
    """Per target: pending count, when the oldest pending was made, dead letters."""
    await outbox.accept(b"a", SIG, [Route("one", None), Route("gone", None)], 1.0)
    await outbox.accept(b"b", SIG, [Route("one", None)], 3.0)
    await _dead(outbox, b"c", "two", 4.0)
    assert await outbox.backlog() == [
        Backlog("gone", 1, 1.0, 0),
        Backlog("one", 2, 1.0, 0),
        Backlog("two", 0, None, 1),
    ]


async def test_get_finds_one_delivery_and_none_for_an_unknown_id(outbox: SqliteOutbox) -> None:
    """``get`` returns the delivery with its last outcome; another outbox's id finds nothing."""
    delivery_id = await _dead(outbox, b"a", "t", 1.0)
    found = await outbox.get(delivery_id)
    assert found is not None
    assert (found.state, found.attempts, found.last_status) == ("dead", 1, 400)
    assert await outbox.get("elsewhere-1") is None


async def test_replay_many_replays_dead_letters_by_target_and_since(
    outbox: SqliteOutbox,
) -> None:
    """Bulk replay: only the given state, target and time window; the count is returned."""
    await _dead(outbox, b"old", "t", 1.0)
    await _dead(outbox, b"new", "t", 10.0)
    await _dead(outbox, b"other", "u", 10.0)
    assert await outbox.replay_many(state="dead", target="t", since=5.0, now=20.0) == 1
    assert [d.body for d in await outbox.query(state="pending")] == [b"new"]
    assert await outbox.replay_many(state="dead", target=None, since=None, now=21.0) == 2
    assert await outbox.query(state="dead") == []


async def test_purge_dead_removes_only_dead_letters_older_than_the_cutoff(
    outbox: SqliteOutbox,
) -> None:
    """Pending deliveries and young dead letters stay."""
    await _dead(outbox, b"old", "t", 1.0)
    await _dead(outbox, b"young", "t", 10.0)
    await outbox.accept(b"pending", SIG, [Route("t", None)], 1.0)
    assert await outbox.purge_dead(5.0) == 1
    assert sorted(d.body for d in await outbox.query()) == [b"pending", b"young"]


async def test_purge_dead_works_in_steps_each_its_own_commit(
    counted: tuple[SqliteOutbox, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five expired dead letters, with steps of two: three commits, each a step, so that an
    accept waits for one step and not for every expired dead letter (a month of them held the
    writer, and the other workers' accepts timed out behind it)."""
    outbox, groups = counted
    for n in range(5):
        await _dead(outbox, b"dead %d" % n, "t", 1.0)
    monkeypatch.setattr(store, "PRUNE_BATCH", 2)
    before = len(groups)
    assert await outbox.purge_dead(5.0, now=5.0) == 5
    assert groups[before:] == [1, 1, 1]
    assert await outbox.query(state="dead") == []


async def test_purge_dead_removes_the_notifications_it_leaves_without_deliveries(
    outbox: SqliteOutbox,
) -> None:
    """A dead letter on day 0, then a delivered notification and a prune every day: the prune
    walk passes the dead letter's notification (it still has a delivery) and never goes back.
    When the dead letter expires (day 31), its purge removes its notification too; the
    notification of a delivery that remains stays."""
    await _dead(outbox, b"dead", "t", 0.0)
    for day in range(1, 33):
        (delivery,) = await outbox.accept(b"day %d" % day, SIG, [Route("t", None)], day * DAY) or []
        await outbox.record(delivery.id, Delivered(), AttemptResult(status=200), day * DAY)
        await outbox.prune(day * DAY + 1, 7 * DAY, ["t"])
        await outbox.purge_dead(day * DAY + 1 - 30 * DAY, now=day * DAY + 1)
    bodies = await outbox.run(
        lambda conn: [bytes(row[0]) for row in conn.execute("SELECT body FROM notifications")]
    )
    assert b"dead" not in bodies
    assert b"day 32" in bodies


def _open_and_close(path: Path, ready: Any, go: Any, errors: Any) -> None:
    async def run() -> None:
        box = SqliteOutbox(path, dedup_window_s=DAY)
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


async def _deliver(box: SqliteOutbox, body: bytes, at: float, target: str = "t") -> str:
    """Accept ``body`` at ``at`` with one delivery to ``target``, record it delivered; its id."""
    accepted = await box.accept(body, SIG, [Route(target, None)], at)
    assert accepted is not None
    (delivery,) = accepted
    await box.record(delivery.id, Delivered(), AttemptResult(status=200), at)
    return delivery.id


def _prefix(delivery_id: str) -> str:
    return delivery_id.rpartition("-")[0]


async def test_delivery_ids_are_unique_and_stay_the_same_across_reads_and_reopening(
    tmp_path: Path,
) -> None:
    """accept(), due(), query() and a reopened outbox all name each delivery by one id."""
    path = tmp_path / "o.sqlite3"
    box = SqliteOutbox(path, dedup_window_s=DAY)
    accepted = []
    for n in range(3):
        found = await box.accept(f"{n}".encode(), SIG, [Route("a", None), Route("b", b"e")], 1.0)
        assert found is not None
        accepted.extend(found)
    ids = {d.id: (d.target, d.body) for d in accepted}
    assert len(ids) == 6
    assert len({_prefix(i) for i in ids}) == 1
    assert {d.id: (d.target, d.body) for d in await box.due(2.0, {"a": 9, "b": 9})} == ids
    await box.close()
    reopened = SqliteOutbox(path, dedup_window_s=DAY)
    try:
        assert {d.id: (d.target, d.body) for d in await reopened.query()} == ids
        await reopened.record(accepted[0].id, Delivered(), AttemptResult(status=200), 3.0)
        assert [d.id for d in await reopened.query(state="delivered")] == [accepted[0].id]
    finally:
        await reopened.close()


async def test_two_outboxes_give_their_deliveries_different_ids(tmp_path: Path) -> None:
    """Each file has its own random prefix: the first delivery of two outboxes differs, and
    neither outbox finds the other's id."""
    first = SqliteOutbox(tmp_path / "1.sqlite3", dedup_window_s=DAY)
    second = SqliteOutbox(tmp_path / "2.sqlite3", dedup_window_s=DAY)
    try:
        one = await first.accept(b"a", SIG, [Route("t", None)], 1.0)
        two = await second.accept(b"a", SIG, [Route("t", None)], 1.0)
        assert one is not None
        assert two is not None
        assert _prefix(one[0].id) != _prefix(two[0].id)
        assert one[0].id.rpartition("-")[2] == two[0].id.rpartition("-")[2] == "1"
        assert not await second.replay(one[0].id, 2.0)
        assert await first.replay(one[0].id, 2.0)
    finally:
        await first.close()
        await second.close()


async def test_unknown_or_malformed_delivery_id_finds_nothing_and_never_raises(
    outbox: SqliteOutbox,
) -> None:
    """replay() answers False and record() changes nothing for any id that is not one of this
    outbox's, however it is malformed; the CLI's replay_delivery() likewise."""
    accepted = await outbox.accept(b"a", SIG, [Route("t", None)], 1.0)
    assert accepted is not None
    real = accepted[0].id
    prefix = _prefix(real)
    wrong = [
        "",
        "-",
        "no-such-id",
        "feedface",
        "1",
        f"{prefix}",
        f"{prefix}-",
        f"{prefix}-2",
        f"{prefix}-0",
        f"{prefix}-01",
        f"{prefix}-+1",
        f"{prefix}--1",
        f"{prefix}-1 ",
        f"{prefix}-1.0",
        f"{prefix}-\u0661",  # ARABIC-INDIC DIGIT ONE: a digit to str.isdigit(), not to us
        f"{prefix}-{2**63}",
        f"{prefix}-{'9' * 5000}",
        f"{prefix.upper()}-1",
        f"x{real}",
        f"{real}-1",
    ]
    # A prefix of digits only has no upper case: that spelling is then the real id itself.
    wrong = [delivery_id for delivery_id in wrong if delivery_id != real]
    for delivery_id in wrong:
        assert not await outbox.replay(delivery_id, 5.0), delivery_id
        await outbox.record(delivery_id, DeadLetter("x"), AttemptResult(status=400), 5.0)
    conn = connect(outbox.path)
    try:
        assert not any(replay_delivery(conn, delivery_id, 5.0) for delivery_id in wrong)
        assert [d.id for d in list_deliveries(conn, None, None, 10)] == [real]
    finally:
        conn.close()
    (untouched,) = await outbox.query()
    assert (untouched.state, untouched.attempts, untouched.created_at) == ("pending", 0, 1.0)


async def test_delivery_id_is_not_reused_after_its_row_is_pruned(outbox: SqliteOutbox) -> None:
    """Targets may deduplicate on the id: once pruned, an id is never handed out again."""
    gone = await _deliver(outbox, b"a", 1.0)
    assert await outbox.prune(1.0 + 8 * DAY, DAY, ["t"]) == 1
    assert _rows(outbox.path, "SELECT COUNT(*) FROM deliveries") == [(0,)]
    later = await _deliver(outbox, b"b", 2.0 + 8 * DAY)
    assert later != gone
    assert _prefix(later) == _prefix(gone)


async def test_prune_removes_notifications_that_had_no_deliveries(outbox: SqliteOutbox) -> None:
    """A notification no route matched goes once it is past the deduplication window."""
    assert await outbox.accept(b"unrouted", SIG, [], 1.0) == []
    assert await outbox.prune(1.0 + 6 * DAY, DAY, ["t"]) == 0
    assert _rows(outbox.path, "SELECT COUNT(*) FROM notifications") == [(1,)]
    assert await outbox.prune(1.0 + 8 * DAY, DAY, ["t"]) == 0
    assert _rows(outbox.path, "SELECT COUNT(*) FROM notifications") == [(0,)]


async def test_prune_keeps_a_notification_for_the_deduplication_window(
    outbox: SqliteOutbox,
) -> None:
    """With a retention shorter than the window, the delivered row goes first; the notification
    stays (so the same body is still a duplicate) until the window has passed."""
    await _deliver(outbox, b"a", 1.0)
    assert await outbox.prune(1.0 + 2 * DAY, DAY, ["t"]) == 1
    assert _rows(outbox.path, "SELECT COUNT(*) FROM notifications") == [(1,)]
    assert await outbox.accept(b"a", SIG, [Route("t", None)], 1.0 + 2 * DAY) is None
    assert await outbox.prune(1.0 + 8 * DAY, DAY, ["t"]) == 0
    assert _rows(outbox.path, "SELECT COUNT(*) FROM notifications") == [(0,)]


async def test_prune_stops_at_the_first_notification_inside_the_horizon(
    outbox: SqliteOutbox,
) -> None:
    """Old fully delivered notifications go; younger ones and their rows stay."""
    await _deliver(outbox, b"old", 1.0)
    await _deliver(outbox, b"young", 1.0 + 5 * DAY)
    assert await outbox.prune(1.0 + 8 * DAY, 7 * DAY, ["t"]) == 1
    assert [d.body for d in await outbox.query()] == [b"young"]
    assert _rows(outbox.path, "SELECT body FROM notifications") == [(b"young",)]


async def test_prune_removes_a_notification_the_walk_passed_once_it_is_delivered(
    outbox: SqliteOutbox,
) -> None:
    """An old notification kept for its pending delivery is stepped over by later walks; once
    that delivery is delivered and pruned, the notification goes too."""
    (stuck,) = await outbox.accept(b"stuck", SIG, [Route("t", None)], 1.0) or []
    await _deliver(outbox, b"gone", 2.0)
    await _deliver(outbox, b"young", 9 * DAY)
    assert await outbox.prune(8 * DAY, DAY, ["t"]) == 1
    assert sorted(_rows(outbox.path, "SELECT body FROM notifications")) == [
        (b"stuck",),
        (b"young",),
    ]
    await outbox.record(stuck.id, Delivered(), AttemptResult(status=200), 8 * DAY)
    assert await outbox.prune(10 * DAY, DAY, ["t"]) == 1
    assert _rows(outbox.path, "SELECT body FROM notifications") == [(b"young",)]


async def test_prune_goes_through_a_backlog_larger_than_one_step(
    outbox: SqliteOutbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backlog is removed in several steps, all in one prune() call; dead letters in the
    middle of it stay and do not stop the walk."""
    monkeypatch.setattr(store, "PRUNE_BATCH", 2)
    for n in range(7):
        await _deliver(outbox, f"d{n}".encode(), 1.0 + n)
    (dead,) = await outbox.accept(b"dead", SIG, [Route("t", None)], 10.0) or []
    await outbox.record(dead.id, DeadLetter("x"), AttemptResult(status=400), 10.0)
    for n in range(5):
        await _deliver(outbox, f"e{n}".encode(), 11.0 + n)
    assert await outbox.prune(20.0 + 8 * DAY, 7 * DAY, ["t"]) == 12
    assert [d.body for d in await outbox.query()] == [b"dead"]
    assert _rows(outbox.path, "SELECT body FROM notifications") == [(b"dead",)]


async def test_notifications_accepted_after_the_table_was_emptied_are_pruned(
    outbox: SqliteOutbox,
) -> None:
    """Once pruning has emptied the table, new notifications may take old ids again; they are
    still found and removed when their time comes."""
    await _deliver(outbox, b"a", 1.0)
    await _deliver(outbox, b"b", 2.0)
    assert await outbox.prune(3.0 + 8 * DAY, 7 * DAY, ["t"]) == 2
    assert _rows(outbox.path, "SELECT COUNT(*) FROM notifications") == [(0,)]
    assert await outbox.accept(b"c", SIG, [], 4.0 + 8 * DAY) == []  # no delivery leads to it
    assert await outbox.prune(5.0 + 16 * DAY, 7 * DAY, ["t"]) == 0
    assert _rows(outbox.path, "SELECT COUNT(*) FROM notifications") == [(0,)]


def test_new_file_gets_the_current_layout_and_keeps_its_prefix(tmp_path: Path) -> None:
    """A new file is created with the layout's user_version and one id prefix, which opening
    it again does not change."""
    path = tmp_path / "o.sqlite3"
    connect(path).close()
    first = _rows(path, "SELECT delivery_id_prefix FROM meta")
    connect(path).close()
    assert _rows(path, "SELECT delivery_id_prefix FROM meta") == first
    assert len(first) == 1
    assert _rows(path, "PRAGMA user_version") == [(layout._LAYOUT,)]


def test_outbox_file_of_the_older_layout_is_refused_and_left_alone(tmp_path: Path) -> None:
    """A file made by the previous version (text delivery ids) is refused at open, naming the
    path and what to do, and nothing is written to it."""
    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript(_LAYOUT_1)
    conn.close()
    before = _rows(path, "SELECT * FROM deliveries")
    for opener in (connect, lambda p: SqliteOutbox(p, dedup_window_s=DAY)):
        with pytest.raises(OutboxError) as caught:
            opener(path)
        message = str(caught.value)
        assert message.startswith(f"outbox.path = '{path}': made by an older version")
        assert "deliver or export its pending deliveries with the previous version" in message
        assert "move the file away" in message
    assert _rows(path, "PRAGMA user_version") == [(0,)]
    assert _rows(path, "PRAGMA journal_mode") == [("delete",)]
    assert _rows(path, "SELECT name FROM sqlite_master WHERE name = 'meta'") == []
    assert _rows(path, "SELECT * FROM deliveries") == before


def test_outbox_file_of_an_unknown_layout_is_refused(tmp_path: Path) -> None:
    """A user_version this version does not know (a newer gateway's file) is refused."""
    path = tmp_path / "o.sqlite3"
    connect(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(OutboxError, match=r"outbox\.path = .*made by another version.*layout 99"):
        connect(path)


def test_file_holding_other_tables_is_not_taken_for_an_outbox(tmp_path: Path) -> None:
    """A SQLite file of something else is refused rather than given the outbox's tables."""
    path = tmp_path / "other.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.close()
    with pytest.raises(OutboxError, match=r"not an outbox \(it holds tables users\)"):
        connect(path)
    assert _rows(path, "SELECT name FROM sqlite_master") == [("users",)]
    assert _rows(path, "PRAGMA journal_mode") == [("delete",)]


def test_a_second_owner_through_a_symbolic_link_to_the_file_is_refused(tmp_path: Path) -> None:
    """The owner's lock is beside the file the path leads to: a second gateway given a symbolic
    link to the same outbox file is refused as one given the same path is. (It used to lock a
    lock file of its own beside the link, and both dispatched every delivery.)"""
    real = tmp_path / "data" / "outbox.sqlite3"
    real.parent.mkdir()
    link = tmp_path / "outbox.sqlite3"
    link.symlink_to(real)
    first = OwnerLock(real)
    try:
        with pytest.raises(OutboxError, match="in use by another gateway"):
            OwnerLock(link)
    finally:
        first.release()
    OwnerLock(link).release()  # free once the first has let go
