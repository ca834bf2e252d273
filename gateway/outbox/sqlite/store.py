"""Every statement the gateway runs on the outbox file.

Rule: everything here is a plain function of a ``sqlite3.Connection``, run inside a transaction
its caller owns (:mod:`gateway.outbox.sqlite.writer` for the gateway, a plain connection for the
offline ``deliveries`` command). Nothing here commits, waits or knows about asyncio.

Delivery ids are spelled as :mod:`gateway.outbox.rows` says: the row id is the deliveries
table's own key (AUTOINCREMENT, so an id is never handed out twice, even after pruning), and the
prefix is random, made once with the file.

The layout itself, and opening a file, are :mod:`gateway.outbox.sqlite.layout`'s; the reads
only the admin console makes are :mod:`gateway.outbox.sqlite.history`'s.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import sqlite3
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.outbox.model import STATES, Backlog, Delivery, Route
from gateway.outbox.rows import (
    DELIVERY_COLUMNS,
    backlog_from_rows,
    delivery_from_row,
    delivery_id_of,
    rowid_of,
)
from gateway.outbox.sqlite import conversations
from gateway.outbox.sqlite.layout import read_prefix
from gateway.outbox.sqlite.lineup import Lineup

__all__ = [
    "DAMAGED",
    "PRUNE_BATCH",
    "Attempt",
    "backlog",
    "count_states",
    "dead_letter_damaged",
    "delivered_targets",
    "due_deliveries",
    "insert_notification",
    "list_deliveries",
    "prune_delivered",
    "prune_notifications",
    "purge_dead",
    "record_attempts",
    "replay_deliveries",
    "replay_delivery",
    "touch",
]

_EXCERPT_CHARS = 1024
# Rows one prune step reads or removes: each step is one job in a group commit, so a large
# backlog to prune delays the notifications committed with it by one step (some 100 ms), not by
# all of it. Not smaller: every step rewrites the digest index pages its deletions touch, which
# lie all over that index, so smaller steps cost more CPU per row removed.
PRUNE_BATCH = 5000

# The duplicate check and the insert in one statement: one round trip into SQLite, not two.
_INSERT_NOTIFICATION = (
    "INSERT INTO notifications (digest, received_at, signature, body, trace)"
    " SELECT ?, ?, ?, ?, ?"
    " WHERE NOT EXISTS (SELECT 1 FROM notifications WHERE digest = ? AND received_at >= ?)"
)
_INSERT_DELIVERY = (
    "INSERT INTO deliveries (notification_id, target, body, state, created_at, next_attempt_at,"
    " updated_at, order_key) VALUES (?, ?, ?, 'pending', ?, ?, ?, ?)"
)
# Prune: a notification goes once it is older than the horizon and has no deliveries left.
_DELETE_ORPHAN = (
    "DELETE FROM notifications WHERE id = ? AND received_at < ? AND NOT EXISTS"
    " (SELECT 1 FROM deliveries d WHERE d.notification_id = notifications.id)"
)
_DELETE_ORPHANS_BETWEEN = (
    "DELETE FROM notifications WHERE id > ? AND id <= ? AND received_at < ? AND NOT EXISTS"
    " (SELECT 1 FROM deliveries d WHERE d.notification_id = notifications.id)"
)


def insert_notification(
    conn: sqlite3.Connection,
    digest: bytes,
    since: float,
    now: float,
    signature: str,
    body: bytes,
    routes: Sequence[Route],
    trace: str | None = None,
    lineup: Lineup | None = None,
) -> tuple[int, list[int], list[int]] | None:
    """Store a notification and one delivery per route; ``(notification id, delivery row ids,
    the row ids of those an earlier pending delivery of their conversation may hold back)``,
    or ``None`` when a body with the same digest was received since ``since``. ``trace``: the
    trace context of the request that brought it (:mod:`gateway.tracing`), if traced.
    ``lineup``: the conversations this process's claims keep in order, which tell whether a
    delivery is first of its own (see :meth:`Lineup.behind`); without it, any delivery with a
    conversation may be held back."""
    cursor = conn.execute(
        _INSERT_NOTIFICATION, (digest, now, signature, body, trace, digest, since)
    )
    if cursor.rowcount == 0:
        return None
    notification_id = cursor.lastrowid
    assert notification_id is not None
    # One execute per route, not executemany: each insert's lastrowid is its id, and the usual
    # single route costs less this way.
    rowids, behind = [], []
    for route in routes:
        rowid = conn.execute(
            _INSERT_DELIVERY,
            (notification_id, route.target, route.body, now, now, now, route.key),
        ).lastrowid
        assert rowid is not None
        rowids.append(rowid)
        key = route.key
        if key is None:
            if lineup is not None:
                lineup.stored(route.target, None)
        elif lineup is None or lineup.behind(route.target, key, rowid):
            behind.append(rowid)
    return notification_id, rowids, behind


def _intact(row: tuple[Any, ...]) -> bool:
    """Whether the notification behind a due row still has the digest stored with it: the
    delivery's own body, or for a split delivery (a part of it) the notification's body."""
    notification_body = row[3] if row[18] is None else row[18]
    return hashlib.sha256(notification_body).digest() == bytes(row[17])


def due_deliveries(
    conn: sqlite3.Connection,
    prefix: str,
    now: float,
    limits: Mapping[str, int],
    skip: Collection[str],
    ordered: Collection[str] = (),
    lineup: Lineup | None = None,
) -> tuple[list[Delivery], list[int]]:
    """Pending deliveries due by ``now``, oldest first: at most ``limits[target]`` per target,
    leaving out the ids in ``skip`` and, for the ``ordered`` targets, every delivery behind an
    earlier pending one of its conversation; and the row ids of due deliveries whose body no
    longer matches the digest stored when it was received (damaged in the file: never
    forwarded). One index seek per target without order: a target that is down with a million
    deliveries waiting costs nothing when it is not asked for.

    ``lineup``: the ordered targets' conversations held in memory (:mod:`.lineup`), brought up
    to the file first; each ordered target's first deliveries come from it, in the order they
    were stored (without it, no ordered target's delivery is handed out)."""
    found: list[tuple[tuple[float, int], Delivery]] = []
    damaged: list[int] = []
    if lineup is not None and ordered:
        try:
            conversations.line_up(conn, lineup, ordered, now)
        except BaseException:
            lineup.stale = True
            raise
    for target, limit in limits.items():
        if target not in ordered:
            rows = _due_of(conn, prefix, target, now, limit, skip)
        elif lineup is not None:
            rows = _lined_up(conn, prefix, lineup, target, now, limit, skip)
        else:
            rows = []
        for row in rows:
            if _intact(row):
                found.append(((row[9], row[0]), delivery_from_row(row, prefix)))
            else:
                damaged.append(row[0])
    found.sort(key=lambda pair: pair[0])
    return [delivery for _, delivery in found], damaged


# A target's due deliveries, oldest first, by id alone: the state index holds the due time and
# the row id, so this reads no row.
_DUE_IDS = (
    "SELECT id FROM deliveries WHERE state = 'pending' AND target = ?"
    " AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?"
)


def _due_of(
    conn: sqlite3.Connection,
    prefix: str,
    target: str,
    now: float,
    limit: int,
    skip: Collection[str],
) -> list[tuple[Any, ...]]:
    """Up to ``limit`` rows of ``target``'s due deliveries not in ``skip``, with their bodies
    (in no particular order: the caller sorts them by due time). The ids first, from the
    state index alone, and only then the bodies of those not in flight: a busy target's
    oldest due deliveries are mostly in flight, and reading them with their bodies to drop
    them cost 2.4 rows read per delivery started (bench/README.md)."""
    ids = [
        rowid
        for (rowid,) in conn.execute(_DUE_IDS, (target, now, limit + len(skip)))
        if delivery_id_of(prefix, rowid) not in skip
    ][:limit]
    if not ids:
        return []
    return conn.execute(_BODIES_OF, (json.dumps(ids),)).fetchall()


def _lined_up(
    conn: sqlite3.Connection,
    prefix: str,
    lineup: Lineup,
    target: str,
    now: float,
    limit: int,
    skip: Collection[str],
) -> list[tuple[Any, ...]]:
    """Up to ``limit`` rows of ``target``'s deliveries that ``lineup`` hands out, with their
    bodies: by id, through the table's own key. One no longer pending, or not due after all,
    goes back to the lineup as such."""
    taken = lineup.take(target, limit, now, skip, functools.partial(delivery_id_of, prefix))
    if not taken:
        return []
    by_id = {
        row[0]: row
        for row in conn.execute(_BODIES_OF, (json.dumps([rowid for rowid, _ in taken]),))
    }
    rows = []
    for rowid, key in taken:
        row = by_id.get(rowid)
        if row is None:
            lineup.gone(target, rowid, key, now)
        elif row[9] > now:
            lineup.not_due(target, rowid, key, row[9], now)
        else:
            rows.append(row)
    return rows


_DUE_SELECT = (
    f"SELECT {DELIVERY_COLUMNS}, n.digest,"  # noqa: S608 (constant)
    " CASE WHEN d.body IS NOT NULL THEN n.body END FROM deliveries d"
    " JOIN notifications n ON n.id = d.notification_id"
)


# The pending ones of the deliveries a JSON array of row ids names, with their bodies: one seek
# by the table's key each (the unary + keeps SQLite from the state index instead).
_BODIES_OF = f"{_DUE_SELECT} JOIN json_each(?) AS k ON d.id = k.value WHERE +d.state = 'pending'"


DAMAGED = "body no longer matches the digest stored when it was received (outbox file damaged)"


def dead_letter_damaged(conn: sqlite3.Connection, rowids: Sequence[int], now: float) -> None:
    """Dead-letter the pending deliveries ``rowids``, whose bodies were found damaged."""
    conn.executemany(
        "UPDATE deliveries SET state = 'dead', updated_at = ?, last_error = ?"
        " WHERE id = ? AND state = 'pending'",
        [(now, DAMAGED, rowid) for rowid in rowids],
    )


def backlog(conn: sqlite3.Connection) -> list[Backlog]:
    """Pending deliveries and dead letters per target, with the oldest pending one's age. One
    pass over the (state, target) index ranges; delivered rows are not read."""
    rows = conn.execute(
        "SELECT target, state, COUNT(*), MIN(created_at) FROM deliveries"
        " WHERE state IN ('pending', 'dead') GROUP BY state, target"
    ).fetchall()
    return backlog_from_rows(rows)


@dataclass(frozen=True, slots=True)
class Attempt:
    """The outcome of one attempt, as :func:`record_attempts` stores it on delivery ``rowid``
    (``None``: no such delivery), unless the delivery's ``created_at`` is no longer
    ``created_at`` (replayed since the attempt started: the replay stands)."""

    rowid: int | None
    state: str
    next_attempt_at: float
    now: float
    status: int | None
    error: str | None
    response: str
    held_s: float = 0.0
    created_at: float | None = None


# A replay renews created_at: an attempt that started before it is not recorded over it (a
# comparison in the same statement, on the row it updates anyway).
_RECORD = (
    "UPDATE deliveries SET state = ?, attempts = attempts + 1, next_attempt_at = ?,"
    " updated_at = ?, last_status = ?, last_error = ?, last_response = ?, held_s = ?"
    " WHERE id = ? AND (? IS NULL OR created_at = ?)"
)


# After _RECORD: the delivery's attempt count is this attempt's number.
_HISTORY = (
    "INSERT INTO attempts (delivery_id, number, at, state, status, error, response)"
    " SELECT id, attempts, ?, ?, ?, ?, ? FROM deliveries"
    " WHERE id = ? AND (? IS NULL OR created_at = ?)"
)


def record_attempts(conn: sqlite3.Connection, attempts: Sequence[Attempt]) -> None:
    """Store the outcome of each attempt on its delivery, and in its attempt history."""
    known = [a for a in attempts if a.rowid is not None]
    conn.executemany(
        _RECORD,
        [
            (
                a.state,
                a.next_attempt_at,
                a.now,
                a.status,
                a.error,
                a.response[:_EXCERPT_CHARS],
                a.held_s,
                a.rowid,
                a.created_at,
                a.created_at,
            )
            for a in known
        ],
    )
    conn.executemany(
        _HISTORY,
        [
            (
                a.now,
                a.state,
                a.status,
                a.error,
                a.response[:_EXCERPT_CHARS],
                a.rowid,
                a.created_at,
                a.created_at,
            )
            for a in known
        ],
    )


def touch(conn: sqlite3.Connection) -> None:
    """Write a page and leave the file as it was: readiness proves that writes commit again.
    (An UPDATE to the same value would not do: SQLite leaves a page that does not change clean,
    and commits nothing.)"""
    rowid = conn.execute("INSERT INTO meta (delivery_id_prefix) VALUES ('')").lastrowid
    conn.execute("DELETE FROM meta WHERE rowid = ?", (rowid,))


def count_states(conn: sqlite3.Connection) -> dict[str, int]:
    found = dict(conn.execute("SELECT state, COUNT(*) FROM deliveries GROUP BY state").fetchall())
    return {state: int(found.get(state, 0)) for state in STATES}


def delivered_targets(conn: sqlite3.Connection) -> list[str]:
    """The targets with delivered rows, in order: one seek in the state index each (the
    next target after the last one found), never a pass over the rows."""
    found: list[str] = []
    while True:
        (target,) = conn.execute(
            "SELECT MIN(target) FROM deliveries WHERE state = 'delivered' AND target > ?",
            (found[-1] if found else "",),
        ).fetchone()
        if target is None:
            return found
        found.append(str(target))


def prune_delivered(
    conn: sqlite3.Connection, *, target: str, before: float, horizon: float, walked: int
) -> int:
    """Remove up to ``PRUNE_BATCH`` of ``target``'s rows delivered before ``before``."""
    # A delivered row's next_attempt_at is its delivery time (see record), so the
    # deliveries_due index finds old delivered rows of each target without a scan.
    rows = conn.execute(
        "SELECT next_attempt_at, id, notification_id FROM deliveries"
        " WHERE state = 'delivered' AND target = ? AND next_attempt_at < ?"
        " ORDER BY next_attempt_at, id LIMIT ?",
        (target, before, PRUNE_BATCH),
    ).fetchall()
    if not rows:
        return 0
    # The rows just read are exactly those up to the last one in the index's order: one range
    # delete on the index costs half of deleting them one by one.
    conn.execute(
        "DELETE FROM deliveries WHERE state = 'delivered' AND target = ?"
        " AND (next_attempt_at, id) <= (?, ?)",
        (target, rows[-1][0], rows[-1][1]),
    )
    conn.executemany("DELETE FROM attempts WHERE delivery_id = ?", [(row[1],) for row in rows])
    # The walk in _prune_notifications does not go back over the notifications up to `walked`:
    # those that have just lost their last delivery are removed here, each by its id.
    conn.executemany(
        _DELETE_ORPHAN,
        [
            (notification_id, horizon)
            for notification_id in {row[2] for row in rows}
            if notification_id <= walked
        ],
    )
    return len(rows)


def prune_notifications(
    conn: sqlite3.Connection, *, after: int, horizon: float
) -> tuple[int, bool]:
    """One step of the walk over notifications in id order, from just after ``after``: remove
    those received before ``horizon`` that have no deliveries left. Returns where the next step
    starts and whether the walk is done.

    Ids grow with time, so the first notification inside the horizon ends the walk: a prune
    reads the rows it removes, one more, and the old rows that still have deliveries (pending or
    dead), which ``after`` then steps over until the walk reaches the end of the table, that is
    until the gateway falls idle. Should the clock step back, a young row ends the walk early:
    old rows behind it wait for a later prune; none is removed too soon.
    """
    last, old, young = after, 0, False
    with contextlib.closing(
        conn.execute(
            "SELECT id, received_at FROM notifications WHERE id > ? ORDER BY id LIMIT ?",
            (after, PRUNE_BATCH),
        )
    ) as rows:
        for rowid, received_at in rows:  # row by row: most walks end at the first row read
            if received_at >= horizon:
                young = True
                break
            last, old = rowid, old + 1
    if old:
        conn.execute(_DELETE_ORPHANS_BETWEEN, (after, last, horizon))
    if young:
        return last, True
    if old < PRUNE_BATCH:
        # The end of the table: start from the oldest row next time. Without AUTOINCREMENT a
        # new notification may take an id at or below `after` once the newest rows are gone;
        # while any row after `after` remains (the young row that stopped the walk, which only
        # the walk removes), new ids are above it.
        return 0, True
    return last, False


# Also used by the offline CLI (`deliveries ...`), on a connection of its own.


def list_deliveries(
    conn: sqlite3.Connection,
    state: str | None,
    target: str | None,
    limit: int,
    prefix: str | None = None,
    offset: int = 0,
) -> list[Delivery]:
    """The newest deliveries, filtered, skipping the first ``offset``; ``prefix`` is the
    file's id prefix (read when None)."""
    if prefix is None:
        prefix = read_prefix(conn)
    clause, params = _filters(state=state, target=target)
    where = f" WHERE {clause}" if clause else ""
    # The page's ids first, then their rows: sorting narrow rows rather than rows that carry
    # their bodies: the first page of 100,000 pending deliveries in 33 ms instead of 161.
    rows = conn.execute(
        f"SELECT {DELIVERY_COLUMNS} FROM deliveries d"  # noqa: S608 (constant fragments)
        " JOIN notifications n ON n.id = d.notification_id WHERE d.id IN"
        f" (SELECT id FROM deliveries{where} ORDER BY updated_at DESC, id DESC LIMIT ? OFFSET ?)"
        " ORDER BY d.updated_at DESC, d.id DESC",
        (*params, limit, offset),
    ).fetchall()
    return [delivery_from_row(row, prefix) for row in rows]


def _filters(
    *, state: str | None, target: str | None, since: float | None = None
) -> tuple[str, list[object]]:
    """The conditions on the deliveries table that a listing or a replay of many filters by
    (those given, joined by AND; empty: none) and their parameters."""
    clauses, params = [], list[object]()
    pairs = (("state = ?", state), ("target = ?", target), ("updated_at >= ?", since))
    for clause, value in pairs:
        if value is not None:
            clauses.append(clause)
            params.append(value)
    return " AND ".join(clauses), params


def replay_deliveries(
    conn: sqlite3.Connection, state: str, target: str | None, since: float | None, now: float
) -> int:
    """Make every delivery in ``state`` (of ``target``, changed since ``since``) pending again,
    each at the back of its conversation."""
    where, params = _filters(state=state, target=target, since=since)
    conversations.to_the_back(conn, where, params)
    return int(
        conn.execute(
            "UPDATE deliveries SET state = 'pending', attempts = 0, held_s = 0, created_at = ?,"  # noqa: S608
            f" next_attempt_at = ?, updated_at = ? WHERE {where}",
            (now, now, now, *params),
        ).rowcount
    )


# The targets that have dead letters, one seek each in the state index (the first, then the next
# after the last one found): never a pass over the dead letters themselves.
_FIRST_DEAD_TARGET = "SELECT MIN(target) FROM deliveries WHERE state = 'dead'"
_NEXT_DEAD_TARGET = "SELECT MIN(target) FROM deliveries WHERE state = 'dead' AND target > ?"
# A target's expired dead letters, oldest first. A dead letter's next_attempt_at is never later
# than its updated_at: an attempt that dead-letters a delivery sets both to its time (see
# rows.stored_outcome), and one found damaged at a claim keeps the due time it was claimed at.
# So every dead letter changed before the cutoff lies in the range of deliveries_due below it,
# which SQLite seeks to: with none expired, the range is empty and one index entry is read, where
# "updated_at < ?" alone made it read every dead letter's row. Rows in the range that fail the
# updated_at test are only those found damaged since the cutoff after waiting longer than it.
_EXPIRED_DEAD = (
    "SELECT id, notification_id FROM deliveries WHERE state = 'dead' AND target = ?"
    " AND next_attempt_at < ? AND updated_at < ? ORDER BY next_attempt_at LIMIT ?"
)


def purge_dead(conn: sqlite3.Connection, *, before: float, horizon: float) -> int:
    """Remove up to ``PRUNE_BATCH`` dead letters last changed before ``before`` with their
    attempt history, and each one's notification once no other delivery needs it and it was
    received before ``horizon`` (deduplication no longer needs it). A step, as a prune's: the
    caller repeats it while it removes a full batch. Here, not left to the prune walk: that
    walk does not go back over the notifications it has passed, and it passes those that still
    have a dead letter, so it would keep their bodies for good.

    Target by target (see ``_EXPIRED_DEAD``): a step reads the rows it removes and a seek or
    two per target, whatever the number of dead letters that are not old enough. A dead letter
    whose due time is later than its change (which none of the statements here writes, unless
    the clock stepped back) goes once both are before ``before``."""
    rows: list[tuple[int, int]] = []
    target = conn.execute(_FIRST_DEAD_TARGET).fetchone()[0]
    while target is not None and len(rows) < PRUNE_BATCH:
        rows += conn.execute(
            _EXPIRED_DEAD, (target, before, before, PRUNE_BATCH - len(rows))
        ).fetchall()
        target = conn.execute(_NEXT_DEAD_TARGET, (target,)).fetchone()[0]
    if not rows:
        return 0
    conn.executemany("DELETE FROM attempts WHERE delivery_id = ?", [(row[0],) for row in rows])
    conn.executemany("DELETE FROM deliveries WHERE id = ?", [(row[0],) for row in rows])
    conn.executemany(
        _DELETE_ORPHAN, [(notification_id, horizon) for notification_id in {row[1] for row in rows}]
    )
    return len(rows)


def replay_delivery(
    conn: sqlite3.Connection, delivery_id: str, now: float, prefix: str | None = None
) -> bool:
    """Make one delivery pending again, at the back of its conversation; False when the file
    has no delivery ``delivery_id``."""
    rowid = rowid_of(delivery_id, read_prefix(conn) if prefix is None else prefix)
    if rowid is None:
        return False
    conversations.to_the_back(conn, "id = ?", (rowid,))
    cursor = conn.execute(
        "UPDATE deliveries SET state = 'pending', attempts = 0, held_s = 0, created_at = ?,"
        " next_attempt_at = ?, updated_at = ? WHERE id = ?",
        (now, now, now, rowid),
    )
    return cursor.rowcount == 1
