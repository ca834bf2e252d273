"""The outbox's additions for the admin console: attempt history, one delivery, paging, the
backlog per target, replaying a target's dead letters, and layout 2 files migrated in place."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.outbox import AttemptResult, Backlog, DeadLetter, Delivered, RetryAt, Route
from gateway.outbox.sqlite import layout
from gateway.outbox.sqlite.outbox import SqliteOutbox

DAY = 86400.0
SIG = "sha256=" + "0" * 64

# Layout 2 as the previous version created it, with one pending delivery.
_LAYOUT_2 = """
CREATE TABLE meta (delivery_id_prefix TEXT NOT NULL);
CREATE TABLE notifications (id INTEGER PRIMARY KEY, digest BLOB NOT NULL,
    received_at REAL NOT NULL, signature TEXT NOT NULL, body BLOB NOT NULL);
CREATE INDEX notifications_digest ON notifications (digest, received_at);
CREATE TABLE deliveries (id INTEGER PRIMARY KEY AUTOINCREMENT,
    notification_id INTEGER NOT NULL REFERENCES notifications (id), target TEXT NOT NULL,
    body BLOB, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL, next_attempt_at REAL NOT NULL, updated_at REAL NOT NULL,
    last_status INTEGER, last_error TEXT, last_response TEXT);
CREATE INDEX deliveries_due ON deliveries (state, target, next_attempt_at);
CREATE INDEX deliveries_notification ON deliveries (notification_id);
INSERT INTO meta VALUES ('abcd');
INSERT INTO notifications VALUES (1, x'00', 1.0, 'sha256=0', x'7b7d');
INSERT INTO deliveries (notification_id, target, state, created_at, next_attempt_at,
    updated_at) VALUES (1, 't', 'pending', 1.0, 1.0, 1.0);
PRAGMA user_version = 2;
"""


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[SqliteOutbox]:
    box = SqliteOutbox(tmp_path / "outbox.sqlite3", dedup_window_s=7 * DAY)
    yield box
    await box.close()


async def _one(outbox: SqliteOutbox, body: bytes, target: str = "t", now: float = 1.0) -> str:
    stored = await outbox.accept(body, SIG, [Route(target, None)], now)
    assert stored
    return stored[0].id


async def test_every_attempt_is_kept_in_order_with_its_outcome(outbox: SqliteOutbox) -> None:
    """Each recorded attempt is one history row: number, time, resulting state, status, error
    and the answer's excerpt; a replay starts the numbers again without losing the old rows."""
    delivery = await _one(outbox, b"a")
    await outbox.record(
        delivery, RetryAt(5.0, "HTTP 503"), AttemptResult(status=503, response_excerpt="busy"), 2.0
    )
    await outbox.record(delivery, DeadLetter("HTTP 400"), AttemptResult(status=400), 6.0)
    await outbox.replay(delivery, 7.0)
    ok = AttemptResult(status=200, response_excerpt="ok")
    await outbox.record(delivery, Delivered(), ok, 8.0)
    history = await outbox.attempts(delivery)
    assert [(a.number, a.at, a.state, a.status, a.error, a.response) for a in history] == [
        (1, 2.0, "pending", 503, "HTTP 503", "busy"),
        (2, 6.0, "dead", 400, "HTTP 400", ""),
        (1, 8.0, "delivered", 200, None, "ok"),
    ]
    assert await outbox.attempts("another-1") == []


async def test_get_finds_one_delivery_by_id_and_nothing_for_another_id(
    outbox: SqliteOutbox,
) -> None:
    """get() returns the delivery with its state; an unknown or foreign id gives None."""
    delivery = await _one(outbox, b"a")
    found = await outbox.get(delivery)
    assert found is not None
    assert (found.id, found.state, found.body) == (delivery, "pending", b"a")
    assert await outbox.get(delivery + "9") is None
    assert await outbox.get("nope") is None


async def test_query_pages_with_an_offset_in_a_stable_order(outbox: SqliteOutbox) -> None:
    """Pages of a listing do not overlap and together hold every delivery once."""
    ids = [await _one(outbox, f"b{i}".encode()) for i in range(5)]
    pages = [await outbox.query(limit=2, offset=offset) for offset in (0, 2, 4)]
    seen = [d.id for page in pages for d in page]
    assert [len(page) for page in pages] == [2, 2, 1]
    assert sorted(seen) == sorted(ids)
    assert seen == list(reversed(ids))  # same update time: newest id first


async def test_backlog_counts_pending_and_dead_per_target_with_the_oldest_pending(
    outbox: SqliteOutbox,
) -> None:
    """backlog() gives each target's pending and dead counts and its oldest pending creation
    time; delivered deliveries do not count and a target with nothing owed is absent."""
    await _one(outbox, b"a", "alpha", now=10.0)
    await _one(outbox, b"b", "alpha", now=20.0)
    dead = await _one(outbox, b"c", "beta", now=30.0)
    done = await _one(outbox, b"d", "gamma", now=40.0)
    await outbox.record(dead, DeadLetter("HTTP 400"), AttemptResult(status=400), 31.0)
    await outbox.record(done, Delivered(), AttemptResult(status=200), 41.0)
    assert await outbox.backlog() == [
        Backlog(target="alpha", pending=2, dead=0, oldest_pending_at=10.0),
        Backlog(target="beta", pending=0, dead=1, oldest_pending_at=None),
    ]


async def test_replay_dead_makes_one_targets_dead_letters_pending_only(
    outbox: SqliteOutbox,
) -> None:
    """replay_dead(target) replays that target's dead letters, due now with a fresh count, and
    leaves other targets' dead letters and its own pending deliveries alone."""
    mine = [await _one(outbox, f"m{i}".encode(), "mine") for i in range(3)]
    other = await _one(outbox, b"o", "other")
    for delivery in [*mine[:2], other]:
        await outbox.record(delivery, DeadLetter("HTTP 400"), AttemptResult(status=400), 2.0)
    assert await outbox.replay_many(state="dead", target="mine", since=None, now=5.0) == 2
    assert await outbox.replay_many(state="dead", target="mine", since=None, now=6.0) == 0
    states = {d.id: (d.state, d.attempts) for d in await outbox.query(limit=10)}
    assert states == {
        mine[0]: ("pending", 0),
        mine[1]: ("pending", 0),
        mine[2]: ("pending", 0),
        other: ("dead", 1),
    }
    assert sorted(d.id for d in await outbox.due(5.0, {"mine": 10})) == sorted(mine)


async def test_pruning_a_delivery_removes_its_attempt_history(outbox: SqliteOutbox) -> None:
    """Delivered rows past retention go together with their attempts."""
    delivery = await _one(outbox, b"a")
    await outbox.record(delivery, Delivered(), AttemptResult(status=200), 2.0)
    assert await outbox.prune(3.0 + 8 * DAY, 7 * DAY, ["t"]) == 1
    assert await outbox.attempts(delivery) == []
    conn = sqlite3.connect(outbox.path)
    try:
        assert conn.execute("SELECT COUNT(*) FROM attempts").fetchone() == (0,)
    finally:
        conn.close()


@contextlib.asynccontextmanager
async def _opened(path: Path) -> AsyncIterator[SqliteOutbox]:
    box = SqliteOutbox(path, dedup_window_s=DAY)
    try:
        yield box
    finally:
        await box.close()


def _layout_of(path: Path) -> int:
    """The layout version the file says it has."""
    conn = sqlite3.connect(path)
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        return int(version)
    finally:
        conn.close()


async def _file_of_layout(path: Path, version: int, *removed: str) -> str:
    """A file at ``path`` as layout ``version`` left it, with one pending delivery (its id):
    written at the current layout, then without the columns ``removed`` ("table.column")."""
    async with _opened(path) as box:
        [old] = await box.accept(b"{}", "sha256=x", [Route("t", None)], 1.0) or []
    conn = sqlite3.connect(path)
    for column in removed:
        table, _, name = column.partition(".")
        conn.execute(f"ALTER TABLE {table} DROP COLUMN {name}")
    conn.execute(f"PRAGMA user_version = {version}")
    conn.commit()
    conn.close()
    return old.id


async def test_outbox_file_of_layout_2_is_migrated_and_keeps_its_deliveries(
    tmp_path: Path,
) -> None:
    """A file of the previous layout opens: it gains the attempts table and the current
    version, its pending delivery stays, keeps its id and takes attempts from then on."""
    path = tmp_path / "v2.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript(_LAYOUT_2)
    conn.close()
    async with _opened(path) as box:
        [old] = await box.query()
        assert (old.id, old.state, old.body) == ("abcd-1", "pending", b"{}")
        await box.record(old.id, Delivered(), AttemptResult(status=200), 2.0)
        assert [a.state for a in await box.attempts(old.id)] == ["delivered"]
    assert _layout_of(path) == layout._LAYOUT


async def test_outbox_file_of_layout_4_gains_the_trace_column_and_keeps_its_deliveries(
    tmp_path: Path,
) -> None:
    """A file of layout 4 (no trace context) opens at the current layout: its pending
    delivery stays, with no trace context, and a new notification keeps the one it is given."""
    path = tmp_path / "v4.sqlite3"
    old = await _file_of_layout(path, 4, "notifications.trace", "deliveries.held_s")
    async with _opened(path) as box:
        assert [(d.id, d.trace) for d in await box.query()] == [(old, None)]
        trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        await box.accept(b"[]", "sha256=x", [Route("t", None)], 2.0, trace=trace)
        assert {d.trace for d in await box.due(3.0, {"t": 5})} == {None, trace}
    assert _layout_of(path) == layout._LAYOUT


async def test_outbox_file_of_layout_5_gains_the_held_time_and_keeps_its_deliveries(
    tmp_path: Path,
) -> None:
    """A file of layout 5 (no held time) opens at the current layout: its pending delivery
    stays, held for no time so far, and a retry keeps the held time it carries."""
    path = tmp_path / "v5.sqlite3"
    old = await _file_of_layout(path, 5, "deliveries.held_s")
    async with _opened(path) as box:
        assert [(d.id, d.held_s) for d in await box.query()] == [(old, 0.0)]
        await box.record(old, RetryAt(9.0, "HTTP 503", 4.5), AttemptResult(status=503), 2.0)
        assert [d.held_s for d in await box.query()] == [4.5]
        assert await box.replay(old, 10.0)
        assert [d.held_s for d in await box.query()] == [0.0]
    assert _layout_of(path) == layout._LAYOUT
