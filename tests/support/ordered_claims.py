"""One ordered claim on a SQLite outbox file, statement by statement: for the tests that check
what the claim of an ordered target reads and how SQLite plans it."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Collection
from pathlib import Path

from gateway.outbox.sqlite import store
from gateway.outbox.sqlite.layout import read_prefix

__all__ = ["ordered_claim"]


def ordered_claim(
    path: Path, keys: Collection[str] | None, limit: int
) -> tuple[list[str], list[str], list[str]]:
    """One claim of the ordered target ``t`` with runs of eight on ``path`` (``keys``: by key;
    ``None``: a look at every conversation): the ids it hands out, the statements it ran, and
    the query plan of each of them. A damaged row fails the calling test."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        prefix = read_prefix(conn)
        statements: list[str] = []
        conn.set_trace_callback(statements.append)
        found, damaged = store.due_deliveries(
            conn,
            prefix=prefix,
            now=1e9,
            limits={"t": limit},
            skip=frozenset(),
            ordered=frozenset({"t"}),
            conversations=None if keys is None else {"t": frozenset(keys)},
            runs={"t": 8},
        )
        conn.set_trace_callback(None)
        plans = [
            "\n".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {statement}"))
            for statement in statements
        ]
    assert damaged == []
    return [d.id for d in found], statements, plans
