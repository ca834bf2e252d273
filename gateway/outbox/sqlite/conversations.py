"""The statements of conversation order on the outbox file (targets with ``order =
"conversation"``).

Rule: plain functions of a ``sqlite3.Connection``, inside a transaction their caller owns, like
:mod:`gateway.outbox.sqlite.store`, which uses them. A keyed delivery's place in its
conversation is its id, or the place a replay gave it (``position``); it may go when no pending
delivery of its conversation has an earlier place. A dead letter is not pending, so it releases
the conversation. Every statement here reads the partial index of keyed pending rows
(:mod:`gateway.outbox.sqlite.layout`), never a body.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Mapping, Sequence

__all__ = [
    "after",
    "first_due",
    "followers",
    "following",
    "held_back",
    "is_behind",
    "runs_of",
    "to_the_back",
]

# Whether an earlier delivery of a conversation is pending (a seek in the partial index).
_BEHIND = (
    "SELECT EXISTS (SELECT 1 FROM deliveries WHERE state = 'pending' AND target = ?"
    " AND order_key = ? AND COALESCE(position, id) < ?)"
)

# An ordered target's due deliveries that are first of their conversation: for the keyed ones,
# one pass over the partial index of keyed pending rows (it holds the place and the due time, so
# the rows themselves are not read), taking each conversation's first (SQLite gives the bare
# columns of the row that holds the MIN: https://sqlite.org/lang_select.html#bareagg); and the
# unkeyed ones, accepted before the target kept order, in time order.
_FIRST_DUE = (
    "SELECT id, next_attempt_at, order_key FROM (SELECT id, next_attempt_at, order_key,"
    " MIN(COALESCE(position, id)) FROM deliveries WHERE state = 'pending' AND target = ?"
    " AND order_key IS NOT NULL GROUP BY order_key) WHERE next_attempt_at <= ?"
    " UNION ALL SELECT id, next_attempt_at, NULL FROM deliveries WHERE state = 'pending'"
    " AND target = ? AND next_attempt_at <= ? AND order_key IS NULL"
    " ORDER BY next_attempt_at LIMIT ?"
)

# The first ?3 pending deliveries of each conversation of a JSON array of keys, with their
# places: for each key (the CROSS JOIN keeps the keys the outer loop), the place of its ?3-th
# pending delivery (a seek and ?3 steps in the place index), then the range of the index up to
# it. Both read the index alone, in its order: no temporary b-tree, no row read. Rows come in
# no promised order (SQL promises none without ORDER BY, and an ORDER BY here would be that
# temporary b-tree): runs_of puts each conversation's few in order.
_FIRST_OF = (
    "SELECT k.value, f.id, f.next_attempt_at, COALESCE(f.position, f.id) FROM json_each(?2) AS k"
    " CROSS JOIN deliveries f ON f.state = 'pending' AND f.target = ?1 AND f.order_key = k.value"
    " AND COALESCE(f.position, f.id) <= COALESCE((SELECT COALESCE(g.position, g.id)"
    " FROM deliveries g WHERE g.state = 'pending' AND g.target = ?1 AND g.order_key = k.value"
    " ORDER BY COALESCE(g.position, g.id) LIMIT 1 OFFSET ?3 - 1), 9223372036854775807)"
)

# The first ?4 pending deliveries of a conversation after the place of pending delivery ?3: a
# range of the place index, in its order.
_AFTER = (
    "SELECT f.id, f.next_attempt_at, COALESCE(f.position, f.id) FROM deliveries f"
    " WHERE f.state = 'pending' AND f.target = ?1 AND f.order_key = ?2"
    " AND COALESCE(f.position, f.id) > (SELECT COALESCE(t.position, t.id) FROM deliveries t"
    " WHERE t.id = ?3 AND t.state = 'pending') ORDER BY COALESCE(f.position, f.id) LIMIT ?4"
)

# Replayed deliveries with a conversation go to its back: each takes a new place from the
# deliveries' own id counter (sqlite_sequence, which AUTOINCREMENT keeps), so every delivery
# accepted later comes after them too. Among themselves they keep their order.
_TAKE_PLACES = (
    "UPDATE sqlite_sequence SET seq = seq + ? WHERE name = 'deliveries' RETURNING seq - ?"
)


def is_behind(conn: sqlite3.Connection, target: str, key: str, rowid: int) -> bool:
    """Whether an earlier delivery of ``key``'s conversation than ``rowid`` is pending."""
    (held,) = conn.execute(_BEHIND, (target, key, rowid)).fetchone()
    return bool(held)


def first_due(
    conn: sqlite3.Connection, target: str, now: float, limit: int
) -> list[tuple[int, str | None]]:
    """Up to ``limit`` row ids of ``target``'s deliveries due by ``now`` that are first of
    their conversation, oldest first, each with its conversation key (``None``: accepted
    before the target kept order), from one pass over every conversation."""
    rows = conn.execute(_FIRST_DUE, (target, now, target, now, limit))
    return [(int(rowid), key) for rowid, _, key in rows]


def runs_of(
    conn: sqlite3.Connection, target: str, keys: Collection[str], length: int
) -> dict[str, list[tuple[int, int, float]]]:
    """For each conversation ``keys`` names that has a pending delivery, its first ``length``
    pending deliveries in their order, each as (place, row id, due time): one index seek per
    conversation, which gives a claim by key both its first deliveries and their runs."""
    found: dict[str, list[tuple[int, int, float]]] = {}
    for key, rowid, due_at, place in conn.execute(
        _FIRST_OF, (target, json.dumps(list(keys)), length)
    ):
        run = found.get(key)
        if run is None:
            found[key] = [(place, rowid, due_at)]
        else:
            run.append((place, rowid, due_at))
    for run in found.values():
        run.sort()  # already in order as the plan reads the index: one pass to check
    return found


def followers(
    conn: sqlite3.Connection, target: str, now: float, heads: Mapping[str, int], length: int
) -> dict[int, list[int]]:
    """For each conversation's first delivery (``heads``: key to row id), the row ids of the
    deliveries that follow it, in order, each due by ``now``: at most ``length - 1``, and none
    past the first that is not due. A conversation whose first delivery is no longer the one
    given has none."""
    found: dict[int, list[int]] = {}
    for key, run in runs_of(conn, target, heads, length).items():
        head = run[0][1]
        if heads[key] == head:
            found[head] = following(run, now)
    return found


def following(run: Sequence[tuple[int, int, float]], now: float) -> list[int]:
    """The row ids behind the first of ``run`` (as :func:`runs_of` gives it) that may go with
    it: each due by ``now``, and none past the first that is not."""
    ids = []
    for _, rowid, due_at in run[1:]:
        if due_at > now:
            break
        ids.append(rowid)
    return ids


def after(
    conn: sqlite3.Connection, target: str, now: float, lasts: Mapping[str, int], length: int
) -> dict[str, list[int]]:
    """For each conversation ``lasts`` names (key to the row id of one of its pending
    deliveries), the row ids of the pending deliveries that follow that one, in order, each
    due by ``now``: at most ``length``, and none past the first that is not due. A seek in the
    place index each."""
    found: dict[str, list[int]] = {}
    for key, rowid in lasts.items():
        rows = conn.execute(_AFTER, (target, key, rowid, length)).fetchall()
        ids = following([(0, rowid, 0.0), *((0, r, due_at) for r, due_at, _ in rows)], now)
        if ids:
            found[key] = ids
    return found


def held_back(conn: sqlite3.Connection, targets: Sequence[str]) -> dict[str, int]:
    """Per target, the conversations with more than one pending delivery: those with a
    delivery waiting behind an earlier one."""
    marks = ", ".join("?" * len(targets))
    rows = conn.execute(
        "SELECT target, COUNT(*) FROM (SELECT target FROM deliveries"  # noqa: S608 (marks)
        f" WHERE state = 'pending' AND order_key IS NOT NULL AND target IN ({marks})"
        " GROUP BY target, order_key HAVING COUNT(*) > 1) GROUP BY target",
        targets,
    ).fetchall()
    return {str(target): int(count) for target, count in rows}


def to_the_back(conn: sqlite3.Connection, where: str, params: Sequence[object]) -> None:
    """Give the keyed deliveries ``where`` selects (a constant condition with ``params``) new
    places behind every other delivery, keeping their order among themselves."""
    rows = conn.execute(
        f"SELECT id FROM deliveries WHERE order_key IS NOT NULL AND {where}"  # noqa: S608
        " ORDER BY COALESCE(position, id)",
        tuple(params),
    ).fetchall()
    if not rows:
        return
    ((base,),) = conn.execute(_TAKE_PLACES, (len(rows), len(rows))).fetchall()
    conn.executemany(
        "UPDATE deliveries SET position = ? WHERE id = ?",
        [(base + rank, rowid) for rank, (rowid,) in enumerate(rows, start=1)],
    )
