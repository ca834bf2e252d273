"""The statements of conversation order on the outbox file (targets with ``order =
"conversation"``).

Rule: plain functions of a ``sqlite3.Connection``, inside a transaction their caller owns, like
:mod:`gateway.outbox.sqlite.store`, which uses them. A keyed delivery's place in its
conversation is its id, or the place a replay gave it (``position``); it may go when no pending
delivery of its conversation has an earlier place. A dead letter is not pending, so it releases
the conversation. Which delivery is first of its conversation is known in memory
(:mod:`gateway.outbox.sqlite.lineup`): the file has no index of conversations, and the
statements here read rows by id or every pending delivery of a target, never a conversation.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Sequence

from gateway.outbox.sqlite.lineup import Lineup

__all__ = ["held_back", "line_up", "to_the_back"]

# Replayed deliveries with a conversation go to its back: each takes a new place from the
# deliveries' own id counter (sqlite_sequence, which AUTOINCREMENT keeps), so every delivery
# accepted later comes after them too. Among themselves they keep their order.
_TAKE_PLACES = (
    "UPDATE sqlite_sequence SET seq = seq + ? WHERE name = 'deliveries' RETURNING seq - ?"
)

# The deliveries' id counter: every insert takes its next value, and so does every place a
# replay gives (_TAKE_PLACES). No row until the first insert.
_SEQUENCE = "SELECT seq FROM sqlite_sequence WHERE name = 'deliveries'"

# The deliveries stored since row ?: how many, and the last id. A range of the table's key.
_STORED_SINCE = "SELECT COUNT(*), MAX(id) FROM deliveries WHERE id > ?"

# The pending ones among them of the targets a JSON array names, by id: the same range (the
# unary + keeps SQLite from the state index, a pass over every pending delivery of the target).
_PENDING_SINCE = (
    "SELECT target, order_key, id, next_attempt_at FROM deliveries WHERE id > ?1"
    " AND +state = 'pending' AND +target IN (SELECT value FROM json_each(?2)) ORDER BY id"
)

# Every pending delivery of a target, each conversation's in their order: the state index's
# range of the target, sorted once (at the start, after a replay, or for a target new to order).
_LINES = (
    "SELECT order_key, id, COALESCE(position, id), next_attempt_at FROM deliveries"
    " WHERE state = 'pending' AND target = ? ORDER BY order_key, COALESCE(position, id)"
)


def line_up(conn: sqlite3.Connection, lineup: Lineup, ordered: Collection[str], now: float) -> None:
    """Bring ``lineup`` up to the file for the ``ordered`` targets, in the claim's read
    transaction (of committed rows only): the deliveries stored since its last read, by id,
    when the id counter moved by just as many; every conversation again when it did not (a
    replay took places from it, or rows stored since were removed), or for a target new to
    order. Outcomes committed meanwhile are taken in first."""
    lineup.settle(now)
    fresh = lineup.keep(ordered)
    row = conn.execute(_SEQUENCE).fetchone()
    seq = 0 if row is None else int(row[0])
    if not lineup.stale and seq != lineup.last_seq:
        count, top = conn.execute(_STORED_SINCE, (lineup.last_id,)).fetchone()
        if seq - lineup.last_seq != count:
            lineup.stale = True
        else:
            known = sorted(lineup.targets.difference(fresh))
            if known:
                lineup.add(conn.execute(_PENDING_SINCE, (lineup.last_id, json.dumps(known))), now)
            lineup.read_to(int(top), seq)
    if lineup.stale:
        fresh = list(ordered)
        (top,) = conn.execute("SELECT MAX(id) FROM deliveries").fetchone()
        lineup.read_to(int(top or 0), seq)
    for target in fresh:
        lineup.load(target, conn.execute(_LINES, (target,)), now)


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
