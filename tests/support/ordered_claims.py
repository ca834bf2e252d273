"""One ordered claim on a SQLite outbox file, statement by statement: for the tests that check
what the claim of an ordered target reads and how SQLite plans it."""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
from collections.abc import Collection
from pathlib import Path

from gateway.outbox.sqlite import store
from gateway.outbox.sqlite.layout import read_prefix
from gateway.outbox.sqlite.lineup import Lineup

__all__ = ["bodies_read", "ordered_claim"]

# The JSON array of row ids a statement that reads bodies by id was given (the trace callback
# sees each statement with its parameters in place).
_IDS = re.compile(r"json_each\('(\[[0-9, ]*\])'\)")


def ordered_claim(
    path: Path,
    limit: int,
    lineup: Lineup | None = None,
    *,
    now: float = 1e9,
    skip: Collection[str] = (),
) -> tuple[list[str], list[str], list[str]]:
    """One claim of the ordered target ``t`` on ``path`` with ``lineup`` (a new one when
    ``None``: the claim of a dispatcher that just started), leaving out the ids in ``skip``:
    the ids it hands out, the statements it ran, and the query plan of each of them. A
    damaged row fails the calling test."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        prefix = read_prefix(conn)
        statements: list[str] = []
        conn.set_trace_callback(statements.append)
        found, damaged = store.due_deliveries(
            conn,
            prefix=prefix,
            now=now,
            limits={"t": limit},
            skip=frozenset(skip),
            ordered=frozenset({"t"}),
            lineup=Lineup() if lineup is None else lineup,
        )
        conn.set_trace_callback(None)
        plans = [
            "\n".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {statement}"))
            for statement in statements
        ]
    assert damaged == []
    return [d.id for d in found], statements, plans


def bodies_read(statement: str) -> list[int] | None:
    """The row ids whose bodies ``statement`` reads by id; ``None`` for another statement."""
    match = _IDS.search(statement)
    if match is None or "body" not in statement:
        return None
    return [int(rowid) for rowid in json.loads(match.group(1))]
