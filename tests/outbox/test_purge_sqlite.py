"""Expiring dead letters on a SQLite outbox: what a purge reads when nothing has expired, and
what it reports when a step fails after others have committed. Real files, real locks."""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.errors import OutboxError
from gateway.outbox.sqlite import layout, store
from gateway.outbox.sqlite.outbox import SqliteOutbox

DAY = 86400.0


def _fill(path: Path, rows: list[tuple[str, float, float]]) -> None:
    """Dead letters ``(target, next_attempt_at, updated_at)``, each with its own notification
    and one attempt, written straight into a new outbox file: far quicker than accepting and
    recording tens of thousands, and the rows are those the gateway writes. A dead letter
    recorded after an attempt has next_attempt_at = updated_at (see rows.stored_outcome); one
    found damaged at a claim keeps the earlier due time it was claimed at."""
    conn = layout.connect(path)
    try:
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO notifications (id, digest, received_at, signature, body)"
            " VALUES (?, ?, 0, 'sig', ?)",
            [(n, hashlib.sha256(b"%d" % n).digest(), b"%d" % n) for n in range(1, len(rows) + 1)],
        )
        conn.executemany(
            "INSERT INTO deliveries (id, notification_id, target, state, created_at,"
            " next_attempt_at, updated_at) VALUES (?, ?, ?, 'dead', 0, ?, ?)",
            [(n, n, target, due, updated) for n, (target, due, updated) in enumerate(rows, 1)],
        )
        conn.executemany(
            "INSERT INTO attempts (delivery_id, number, at, state, response)"
            " VALUES (?, 1, ?, 'dead', '')",
            [(n, updated) for n, (_, _, updated) in enumerate(rows, 1)],
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


def _left(path: Path) -> tuple[list[tuple[str, float]], int, int]:
    """The dead letters left (target, updated_at), the attempts and notifications left."""
    conn = sqlite3.connect(path)
    try:
        dead = conn.execute(
            "SELECT target, updated_at FROM deliveries WHERE state = 'dead' ORDER BY id"
        ).fetchall()
        (attempts,) = conn.execute("SELECT COUNT(*) FROM attempts").fetchone()
        (notifications,) = conn.execute("SELECT COUNT(*) FROM notifications").fetchone()
    finally:
        conn.close()
    return dead, int(attempts), int(notifications)


def _instructions(conn: sqlite3.Connection) -> Iterator[int]:
    """Count the virtual machine instructions SQLite runs on ``conn`` (a progress handler
    called after each one): each row or index entry a statement visits costs several, so the
    count says how much of the table a statement read."""
    count = [0]

    def tick() -> int:
        count[0] += 1
        return 0

    conn.set_progress_handler(tick, 1)
    try:
        yield 0
    finally:
        conn.set_progress_handler(None, 1)
    yield count[0]


def test_a_purge_with_nothing_expired_reads_a_few_index_entries_not_every_dead_letter(
    tmp_path: Path,
) -> None:
    """50,000 dead letters of three targets, none older than the cutoff: the purge finds that
    with fewer instructions than there are dead letters (it read every one's row, once a
    minute, as a writer job that accepts wait behind: 0.2 s at a million)."""
    path = tmp_path / "outbox.sqlite3"
    count = 50_000
    targets = ("a", "b", "c")
    _fill(path, [(targets[n % 3], 1000.0 + n, 1000.0 + n) for n in range(count)])
    conn = layout.connect(path)
    try:
        counter = _instructions(conn)
        next(counter)
        conn.execute("BEGIN IMMEDIATE")
        assert store.purge_dead(conn, before=1000.0, horizon=1000.0) == 0
        conn.execute("COMMIT")
        used = next(counter)
    finally:
        conn.close()
    assert used < count / 10, f"{used} SQLite instructions for {count} dead letters"
    assert len(_left(path)[0]) == count


async def test_expired_dead_letters_are_all_removed_and_counted_whatever_their_target(
    tmp_path: Path,
) -> None:
    """Expired dead letters of three targets, more than one step's worth, among young ones: each
    expired one goes, with its attempts and notification, and is counted once; the young ones
    stay. So do a damaged one's: due long ago, dead-lettered recently (its update decides), and
    one due recently but dead-lettered long ago, which is kept until its due time is past the
    cutoff as well (its due time is no later than its change unless the clock stepped back)."""
    path = tmp_path / "outbox.sqlite3"
    expired = store.PRUNE_BATCH + 1234
    rows = [(("a", "b", "c")[n % 3], 10.0 + n % 50, 10.0 + n % 50) for n in range(expired)]
    rows += [(("a", "b", "c")[n % 3], 100.0 + n, 100.0 + n) for n in range(300)]
    rows += [("b", 5.0, 150.0), ("c", 150.0, 5.0), ("d", 5.0, 20.0)]
    _fill(path, rows)
    outbox = SqliteOutbox(path, dedup_window_s=0.0)
    try:
        assert await outbox.purge_dead(100.0, now=100.0) == expired + 1
        assert await outbox.purge_dead(100.0, now=100.0) == 0
        assert await outbox.purge_dead(151.0, now=151.0) == 53
    finally:
        await outbox.close()
    dead, attempts, notifications = _left(path)
    assert dead == [(("a", "b", "c")[n % 3], 100.0 + n) for n in range(51, 300)]
    assert attempts == notifications == len(dead)


@pytest.fixture
def locker(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    """A second connection to the outbox file, as a ``sqlite3`` shell or a backup tool would
    hold one. It is used on the outbox's writer thread (from its commit hook)."""
    conn = sqlite3.connect(
        tmp_path / "outbox.sqlite3", isolation_level=None, timeout=0, check_same_thread=False
    )
    yield conn
    if conn.in_transaction:
        conn.execute("ROLLBACK")
    conn.close()


async def test_a_purge_that_fails_after_a_step_committed_returns_what_it_removed(
    tmp_path: Path, locker: sqlite3.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """Two steps' worth of expired dead letters. Once the first step has committed, another
    connection takes the write lock and keeps it past the busy timeout, so the second step
    fails: the purge returns the first step's count (the caller's warning and counter report
    those, which are gone) and logs why it stopped. The next purge removes the rest."""
    path = tmp_path / "outbox.sqlite3"
    total = store.PRUNE_BATCH + 10
    _fill(path, [("t", 1.0, 1.0)] * total)
    armed = [False]

    def lock_after_commit(_size: int) -> None:
        # On the writer thread, just after the first step's commit, before the next begins.
        if armed[0]:
            armed[0] = False
            locker.execute("BEGIN IMMEDIATE")

    outbox = SqliteOutbox(path, dedup_window_s=0.0, busy_timeout_s=0.2, on_commit=lock_after_commit)
    try:
        armed[0] = True
        with caplog.at_level(logging.WARNING, logger="gateway.outbox.sqlite.outbox"):
            assert await outbox.purge_dead(5.0, now=5.0) == store.PRUNE_BATCH
        assert locker.in_transaction
        assert any(
            "stopped removing expired dead letters after 5000" in r.getMessage()
            and "locked" in r.getMessage()
            for r in caplog.records
        ), [r.getMessage() for r in caplog.records]
        locker.execute("ROLLBACK")
        assert await outbox.purge_dead(5.0, now=5.0) == 10
    finally:
        await outbox.close()
    assert _left(path) == ([], 0, 0)


async def test_a_purge_that_fails_before_removing_anything_raises(
    tmp_path: Path, locker: sqlite3.Connection
) -> None:
    """Nothing removed, nothing to report: the failure is the caller's (retention logs it)."""
    path = tmp_path / "outbox.sqlite3"
    _fill(path, [("t", 1.0, 1.0)] * 3)
    outbox = SqliteOutbox(path, dedup_window_s=0.0, busy_timeout_s=0.2)
    try:
        locker.execute("BEGIN IMMEDIATE")
        with pytest.raises(OutboxError, match="locked"):
            await outbox.purge_dead(5.0, now=5.0)
        locker.execute("ROLLBACK")
        assert await outbox.purge_dead(5.0, now=5.0) == 3
    finally:
        await outbox.close()
