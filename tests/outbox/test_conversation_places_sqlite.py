"""Conversation order in the SQLite outbox without an index of conversations (layout 8): the
one dispatcher's claims line each ordered target's pending deliveries up in memory
(:mod:`gateway.outbox.sqlite.lineup`) and hand out each conversation's first one, lowest place
first; a file of an older layout, with its index of conversations, migrates in place."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest

from gateway.outbox import AttemptResult, DeadLetter, Delivered, Route
from gateway.outbox.sqlite import layout, store
from gateway.outbox.sqlite.layout import read_prefix
from gateway.outbox.sqlite.lineup import Lineup
from gateway.outbox.sqlite.outbox import SqliteOutbox

SIG = "sha256=" + "0" * 64
DAY = 86400.0
CONVERSATIONS, EACH = 12, 5
OK = AttemptResult(status=200)

# The index of conversations each older layout had, as it created it: layout 6's on the
# replayed place alone, layout 7's on each keyed pending delivery's place.
_OLD_INDEX = {
    6: (
        "CREATE INDEX deliveries_order ON deliveries (target, order_key, position, next_attempt_at)"
        " WHERE state = 'pending' AND order_key IS NOT NULL"
    ),
    7: (
        "CREATE INDEX deliveries_place ON deliveries"
        " (target, order_key, COALESCE(position, id), next_attempt_at)"
        " WHERE state = 'pending' AND order_key IS NOT NULL"
    ),
}


async def _backlog(path: Path) -> list[tuple[str, str]]:
    """EACH pending deliveries of each of CONVERSATIONS conversations of the ordered target
    ``t`` stored one at a time (acknowledgement order), the second of ``k1`` then replayed to
    the back of its conversation; each delivery's (key, id) in the order of their places."""
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


def _firsts(stored: list[tuple[str, str]]) -> dict[str, str]:
    """Each conversation's first delivery, by key."""
    firsts: dict[str, str] = {}
    for key, delivery_id in stored:
        firsts.setdefault(key, delivery_id)
    return firsts


def _as_layout(path: Path, version: int) -> None:
    """Turn the file back into what layout ``version`` (6 or 7) wrote: its index of
    conversations, its version (the columns are the same)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(_OLD_INDEX[version])
        conn.execute(f"PRAGMA user_version = {version}")
        conn.commit()


def _indexes(path: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall()
        (version,) = conn.execute("PRAGMA user_version").fetchone()
    return {str(name) for (name,) in rows} | {f"layout {version}"}


def _sql(path: Path, statement: str, *params: object) -> None:
    """Change the file behind the outbox's back (as another program would)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(statement, params)
        conn.commit()


def _rowid(path: Path, delivery_id: str) -> int:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        prefix = read_prefix(conn)
    return int(delivery_id.removeprefix(f"{prefix}-"))


def _claim(
    path: Path, lineup: Lineup, limit: int, now: float = 1000.0, skip: frozenset[str] = frozenset()
) -> list[str]:
    """One claim of the ordered target ``t`` with ``lineup``: the ids it hands out."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        found, damaged = store.due_deliveries(
            conn,
            read_prefix(conn),
            now,
            {"t": limit},
            skip,
            ordered=frozenset({"t"}),
            lineup=lineup,
        )
    assert damaged == []
    return [d.id for d in found]


async def _drain_in_claims(box: SqliteOutbox) -> list[tuple[str, str]]:
    """Claim four at a time and deliver until nothing is pending, as the dispatcher's claims
    do; each handed-out delivery's (key, id) in order."""
    sent: list[tuple[str, str]] = []
    now = 1000.0
    for _ in range(100):
        due = await box.due(now, {"t": 4}, ordered={"t"})
        if not due:
            break
        for delivery in due:
            assert delivery.order_key is not None
            sent.append((delivery.order_key, delivery.id))
        await box.record_many([(d.id, Delivered(), OK) for d in due], now)
        now += 1.0
    return sent


@pytest.mark.parametrize("version", [6, 7])
async def test_a_layout_6_or_7_file_with_pending_ordered_deliveries_migrates_and_drains_in_order(
    tmp_path: Path, version: int
) -> None:
    """A file of layout 6 or 7 holding pending ordered deliveries (one replayed to the back of
    its conversation) opens at layout 8 without its index of conversations, and drains in the
    order of the deliveries' places: acknowledgement order, the replayed one last."""
    path = tmp_path / f"v{version}.sqlite3"
    stored = await _backlog(path)
    _as_layout(path, version)
    old = {6: "deliveries_order", 7: "deliveries_place"}[version]
    assert {old, f"layout {version}"} <= _indexes(path)
    box = SqliteOutbox(path, dedup_window_s=DAY)
    try:
        sent = await _drain_in_claims(box)
        assert (await box.counts())["pending"] == 0
    finally:
        await box.close()
    found = _indexes(path)
    assert layout._LAYOUT == 8
    assert "layout 8" in found
    assert not {"deliveries_order", "deliveries_place"} & found
    assert sent == stored


async def test_a_claim_hands_out_only_the_first_pending_delivery_of_each_conversation(
    tmp_path: Path,
) -> None:
    """With room for every delivery, a claim hands out one per conversation: its first
    pending one (for ``k1``, its first, not the replayed one)."""
    path = tmp_path / "outbox.sqlite3"
    stored = await _backlog(path)
    handed = _claim(path, Lineup(), limit=len(stored))
    assert sorted(handed) == sorted(_firsts(stored).values())


async def test_a_claim_takes_the_lowest_places_first_not_the_earliest_due(
    tmp_path: Path,
) -> None:
    """With room for three, a claim takes the first deliveries of the three conversations
    stored first, though every later one has been due longer."""
    path = tmp_path / "outbox.sqlite3"
    stored = await _backlog(path)
    _sql(path, "UPDATE deliveries SET next_attempt_at = 500 - id")
    firsts = _firsts(stored)
    handed = _claim(path, Lineup(), limit=3)
    assert sorted(handed) == sorted(firsts[key] for key in ("k0", "k1", "k2"))


async def test_a_replay_after_claims_puts_the_delivery_at_its_new_place(
    tmp_path: Path,
) -> None:
    """A dead letter replayed once claims have lined the conversations up comes at the place
    its replay gave it: after the pending deliveries of its conversation and after another
    conversation's first one stored before the replay, before a delivery stored after it."""
    path = tmp_path / "outbox.sqlite3"
    box = SqliteOutbox(path, dedup_window_s=DAY)
    try:
        made = []
        for n, key in enumerate(["a", "a", "b"]):
            accepted = await box.accept(b'{"n":%d}' % n, SIG, [Route("t", None, key)], 1000.0)
            assert accepted is not None
            made.append(accepted[0].id)
        a1, a2, b1 = made
        assert sorted(d.id for d in await box.due(2000.0, {"t": 10}, ordered={"t"})) == sorted(
            [a1, b1]
        )
        await box.record_many([(a1, DeadLetter("HTTP 400"), AttemptResult(status=400))], 2001.0)
        assert await box.replay(a1, 2002.0)
        later = await box.accept(b'{"n":9}', SIG, [Route("t", None, "a")], 2003.0)
        assert later is not None
        order: list[str] = []
        for _ in range(4):
            due = await box.due(3000.0, {"t": 1}, ordered={"t"})
            assert len(due) == 1, order
            order.append(due[0].id)
            await box.record_many([(due[0].id, Delivered(), OK)], 3001.0)
        assert await box.due(3000.0, {"t": 10}, ordered={"t"}) == []
    finally:
        await box.close()
    assert order == [a2, b1, a1, later[0].id]


@pytest.mark.parametrize(
    "ended",
    [
        pytest.param("UPDATE deliveries SET state = 'delivered' WHERE id = ?", id="delivered"),
        pytest.param("DELETE FROM deliveries WHERE id = ?", id="removed"),
    ],
)
async def test_a_first_delivery_that_ended_elsewhere_is_dropped_and_the_next_one_comes(
    tmp_path: Path, ended: str
) -> None:
    """A first delivery the lineup still holds, which the file says is no longer pending
    (ended without the lineup being told), is never handed out again: the next delivery of
    its conversation comes instead, and every other conversation keeps its own."""
    path = tmp_path / "outbox.sqlite3"
    stored = await _backlog(path)
    lineup = Lineup()
    firsts = _firsts(stored)
    assert sorted(_claim(path, lineup, limit=CONVERSATIONS)) == sorted(firsts.values())
    _sql(path, ended, _rowid(path, firsts["k2"]))
    in_flight = frozenset(d for k, d in firsts.items() if k != "k2")
    handed = _claim(path, lineup, limit=CONVERSATIONS, now=1001.0, skip=in_flight)
    handed += _claim(
        path, lineup, limit=CONVERSATIONS, now=1002.0, skip=in_flight | frozenset(handed)
    )
    second = [d for k, d in stored if k == "k2"][1]
    assert handed == [second]


@pytest.mark.parametrize("when", ["when read", "when handed out"])
async def test_a_delivery_whose_row_is_not_yet_due_is_not_handed_out(
    tmp_path: Path, when: str
) -> None:
    """A first delivery whose row says it is due later (already when the claim reads it, or
    set behind the lineup's back after it was handed out and let go) is not handed out, nor
    is any delivery behind it; it comes once its time has come."""
    path = tmp_path / "outbox.sqlite3"
    stored = await _backlog(path)
    firsts = _firsts(stored)
    lineup = Lineup()
    k3 = _rowid(path, firsts["k3"])
    if when == "when read":
        _sql(path, "UPDATE deliveries SET next_attempt_at = 5000 WHERE id = ?", k3)
    else:
        assert sorted(_claim(path, lineup, limit=CONVERSATIONS)) == sorted(firsts.values())
        _sql(path, "UPDATE deliveries SET next_attempt_at = 5000 WHERE id = ?", k3)
    others = sorted(d for k, d in firsts.items() if k != "k3")
    # Nothing in flight: every first delivery is offered again, the one due later aside.
    assert sorted(_claim(path, lineup, limit=len(stored), now=2000.0)) == others
    assert sorted(_claim(path, lineup, limit=len(stored), now=4999.0)) == others
    assert sorted(_claim(path, lineup, limit=len(stored), now=5000.0)) == sorted(firsts.values())
