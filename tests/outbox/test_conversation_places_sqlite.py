"""Each delivery's place in its conversation in the SQLite layout: the index the ordered claim
reads (no temporary b-tree on the claim), and a file of the layout before it migrated in place."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Collection
from pathlib import Path

import pytest
from ordered_claims import ordered_claim

from gateway.outbox import AttemptResult, Delivered, Route
from gateway.outbox.sqlite import conversations, layout
from gateway.outbox.sqlite.layout import read_prefix
from gateway.outbox.sqlite.outbox import SqliteOutbox

SIG = "sha256=" + "0" * 64
DAY = 86400.0
CONVERSATIONS, EACH = 12, 5

# Layout 6's index of ordered delivery, which layout 7 replaced.
_LAYOUT_6_ORDER = (
    "CREATE INDEX deliveries_order ON deliveries (target, order_key, position, next_attempt_at)"
    " WHERE state = 'pending' AND order_key IS NOT NULL"
)


async def _backlog(path: Path) -> list[tuple[str, str]]:
    """EACH pending deliveries of each of CONVERSATIONS conversations of the ordered target
    ``t`` stored one at a time (acknowledgement order), the second of ``k1`` then replayed to
    the back of its conversation; each delivery's (key, id) in acknowledgement order."""
    box = SqliteOutbox(path, dedup_window_s=DAY)
    try:
        stored = []
        for n in range(CONVERSATIONS * EACH):
            key = f"k{n % CONVERSATIONS}"
            accepted = await box.accept(b'{"n":%d}' % n, SIG, [Route("t", None, key)], 1.0 + n)
            assert accepted is not None
            stored.append((key, accepted[0].id))
        replayed = [d for k, d in stored if k == "k1"][1]
        assert await box.replay(replayed, 100.0)
    finally:
        await box.close()
    stored.remove(("k1", replayed))
    return [*stored, ("k1", replayed)]


def _as_layout_6(path: Path) -> None:
    """Turn the file back into what layout 6 wrote: its order index, its version."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("DROP INDEX deliveries_place")
        conn.execute(_LAYOUT_6_ORDER)
        conn.execute("PRAGMA user_version = 6")
        conn.commit()


def _indexes(path: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall()
        (version,) = conn.execute("PRAGMA user_version").fetchone()
    return {str(name) for (name,) in rows} | {f"layout {version}"}


async def _drain_in_claims(box: SqliteOutbox) -> list[tuple[str, str]]:
    """Claim and deliver until nothing is pending, as the dispatcher's claims do (runs of
    eight, every conversation, then by key); each handed-out delivery's (key, id) in order."""
    sent: list[tuple[str, str]] = []
    now = 1000.0
    for _ in range(100):
        keys = None if len(sent) % 2 else {f"k{n}" for n in range(CONVERSATIONS)}
        due = await box.due(
            now,
            {"t": 4},
            ordered={"t"},
            conversations=None if keys is None else {"t": keys},
            runs={"t": 8},
        )
        if not due:
            break
        for delivery in due:
            assert delivery.order_key is not None
            sent.append((delivery.order_key, delivery.id))
        await box.record_many([(d.id, Delivered(), AttemptResult(status=200)) for d in due], now)
        now += 1.0
    return sent


async def test_a_layout_6_file_with_pending_ordered_deliveries_migrates_and_drains_in_order(
    tmp_path: Path,
) -> None:
    """A file of layout 6 holding pending ordered deliveries (one replayed to the back of its
    conversation) opens at layout 7 with the place index instead of the old one, and drains
    each conversation in acknowledgement order, the replayed one last."""
    path = tmp_path / "v6.sqlite3"
    stored = await _backlog(path)
    _as_layout_6(path)
    assert {"deliveries_order", "layout 6"} <= _indexes(path)
    box = SqliteOutbox(path, dedup_window_s=DAY)
    try:
        sent = await _drain_in_claims(box)
    finally:
        await box.close()
    found = _indexes(path)
    assert {"deliveries_place", f"layout {layout._LAYOUT}"} <= found
    assert "deliveries_order" not in found
    assert sorted(sent) == sorted(stored)
    for key in {k for k, _ in stored}:
        assert [d for k, d in sent if k == key] == [d for k, d in stored if k == key], key


def _claim_plans(path: Path, keys: Collection[str] | None) -> list[tuple[str, str]]:
    """One ordered claim with runs of eight (``keys``: by key; ``None``: a look at every
    conversation): each statement it ran, with its query plan."""
    ids, statements, plans = ordered_claim(path, keys, limit=3)
    assert len(ids) == 3 * EACH
    return list(zip(statements, plans, strict=True))


async def test_a_claim_by_key_reads_the_place_index_in_order_with_no_temporary_sort(
    tmp_path: Path,
) -> None:
    """A claim by key finds each conversation's first deliveries and its run as a range of
    the place index in its order: no temporary b-tree anywhere in the claim."""
    path = tmp_path / "outbox.sqlite3"
    await _backlog(path)
    plans = _claim_plans(path, {"k2", "k5", "k7"})
    assert len(plans) == 2
    for statement, plan in plans:
        assert "TEMP B-TREE" not in plan, (statement, plan)
    (runs,) = [plan for statement, plan in plans if "order_key = k.value" in statement]
    assert "USING INDEX deliveries_place (target=? AND order_key=? AND <expr><?)" in runs, runs


async def test_a_look_at_every_conversation_sorts_only_their_first_deliveries_by_due_time(
    tmp_path: Path,
) -> None:
    """A look at every conversation groups the place index in its order (no temporary b-tree
    per conversation or for the grouping): the one sort left is of each conversation's
    first delivery by due time, which that look hands out oldest first."""
    path = tmp_path / "outbox.sqlite3"
    await _backlog(path)
    plans = _claim_plans(path, None)
    (heads,) = [plan for statement, plan in plans if "GROUP BY order_key" in statement]
    assert "SEARCH deliveries USING INDEX deliveries_place" in heads, heads
    assert "GROUP BY" not in heads, heads
    assert heads.count("TEMP B-TREE") == 1, heads
    assert "USE TEMP B-TREE FOR ORDER BY" in heads, heads
    for statement, plan in plans:
        if "GROUP BY order_key" not in statement:
            assert "TEMP B-TREE" not in plan, (statement, plan)


async def test_storing_behind_a_pending_delivery_is_a_range_seek_in_the_place_index(
    tmp_path: Path,
) -> None:
    """The check a new delivery makes for an earlier pending one of its conversation seeks
    the place index by key and place."""
    path = tmp_path / "outbox.sqlite3"
    await _backlog(path)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        plan = "\n".join(
            row[3]
            for row in conn.execute(
                f"EXPLAIN QUERY PLAN {conversations._BEHIND}", ("t", "k1", 10**9)
            )
        )
    assert "USING INDEX deliveries_place (target=? AND order_key=? AND <expr><?)" in plan, plan
    assert "TEMP B-TREE" not in plan, plan


@pytest.mark.parametrize("length", [1, 3, 8, 50])
async def test_runs_by_key_are_each_conversations_first_pending_in_place_order(
    tmp_path: Path, length: int
) -> None:
    """The runs a claim by key reads hold each conversation's first ``length`` pending
    deliveries in their place (the replayed one last), whatever order the index read gave."""
    path = tmp_path / "outbox.sqlite3"
    stored = await _backlog(path)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        prefix = read_prefix(conn)
        runs = conversations.runs_of(conn, "t", ["k1", "k4"], length)
    for key in ("k1", "k4"):
        expected = [d for k, d in stored if k == key][:length]
        assert [f"{prefix}-{rowid}" for _, rowid, _ in runs[key]] == expected


@pytest.mark.parametrize(
    ("key", "after", "length", "expected"),
    [
        pytest.param("k4", 0, 2, [1, 2], id="the next ones after the first, as many as asked"),
        pytest.param("k4", 1, 8, [2, 3, 4], id="to the end of the conversation"),
        pytest.param("k4", 4, 8, [], id="after the last: none"),
        pytest.param("k1", 2, 8, [3, 4], id="the replayed one last, where its replay put it"),
        pytest.param("k1", 4, 8, [], id="after the replayed one: none"),
    ],
)
async def test_what_follows_a_delivery_is_the_rest_of_its_conversation_in_place_order(
    tmp_path: Path, key: str, after: int, length: int, expected: list[int]
) -> None:
    """``following`` hands out the pending deliveries behind a given one of its
    conversation, in their places (a replayed one at the back), at most ``length``; the
    numbers index each conversation's deliveries in acknowledgement order."""
    path = tmp_path / "outbox.sqlite3"
    stored = await _backlog(path)
    ids = [d for k, d in stored if k == key]
    box = SqliteOutbox(path, dedup_window_s=DAY)
    try:
        found = await box.following(1000.0, "t", {key: ids[after]}, length)
    finally:
        await box.close()
    assert [d.id for d in found.get(key, [])] == [ids[n] for n in expected]
    assert all(d.order_key == key and d.body for d in found.get(key, []))


async def test_nothing_follows_a_delivery_that_is_no_longer_pending_or_not_yet_due(
    tmp_path: Path,
) -> None:
    """A delivery already recorded as delivered (or another store's id) names no place to
    follow; and the deliveries behind one stop at the first that is not due."""
    path = tmp_path / "outbox.sqlite3"
    stored = await _backlog(path)
    k2 = [d for k, d in stored if k == "k2"]
    k3 = [d for k, d in stored if k == "k3"]
    box = SqliteOutbox(path, dedup_window_s=DAY)
    try:
        await box.record_many([(k2[0], Delivered(), AttemptResult(status=200))], 1000.0)
        assert await box.following(1000.0, "t", {"k2": k2[0], "k3": "elsewhere-1"}, 8) == {}
        with contextlib.closing(sqlite3.connect(path)) as conn:
            prefix = read_prefix(conn)
            conn.execute(
                "UPDATE deliveries SET next_attempt_at = 5000 WHERE id = ?",
                (int(k3[3].removeprefix(f"{prefix}-")),),
            )
            conn.commit()
        found = await box.following(1000.0, "t", {"k3": k3[0]}, 8)
    finally:
        await box.close()
    assert [d.id for d in found["k3"]] == k3[1:3]


async def test_what_follows_a_delivery_is_a_range_of_the_place_index_in_order(
    tmp_path: Path,
) -> None:
    """Reading what follows a delivery seeks the place index by key and place, in its order:
    no temporary b-tree."""
    path = tmp_path / "outbox.sqlite3"
    await _backlog(path)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        plan = "\n".join(
            row[3]
            for row in conn.execute(f"EXPLAIN QUERY PLAN {conversations._AFTER}", ("t", "k1", 3, 8))
        )
    assert "USING INDEX deliveries_place (target=? AND order_key=? AND <expr>>?)" in plan, plan
    assert "TEMP B-TREE" not in plan, plan
