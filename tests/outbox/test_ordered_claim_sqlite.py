"""The SQLite outbox's claim for an ordered target, statement by statement: what it reads to
find each conversation's first deliveries and their runs, and how it reads their bodies."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Collection
from pathlib import Path

import pytest

from gateway.edge.routing import Route
from gateway.outbox.sqlite import store
from gateway.outbox.sqlite.layout import read_prefix
from gateway.outbox.sqlite.outbox import SqliteOutbox

SIG = "sha256=" + "0" * 64
CONVERSATIONS, EACH = 20, 4


@pytest.fixture
async def backlog(tmp_path: Path) -> Path:
    """An outbox file holding EACH pending deliveries of each of CONVERSATIONS conversations
    of the ordered target ``t``, interleaved as they would arrive."""
    path = tmp_path / "outbox.sqlite3"
    box = SqliteOutbox(path, dedup_window_s=86400.0)
    for n in range(CONVERSATIONS * EACH):  # one at a time: acknowledgement order is id order
        key = f"k{n % CONVERSATIONS}"
        assert await box.accept(b'{"n":%d}' % n, SIG, [Route("t", None, key)], 1000.0 + n)
    await box.close()
    return path


def claim(
    path: Path, keys: Collection[str] | None, limit: int
) -> tuple[list[str], list[str], list[str]]:
    """One ordered claim with runs of eight on ``path`` (``keys``: by key; ``None``: a look at
    every conversation): the ids it hands out, the statements it ran, and the query plan of
    each of them."""
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


def test_a_claim_by_key_takes_first_deliveries_and_runs_in_one_statement(backlog: Path) -> None:
    """Asked about conversations by key, the claim finds each one's first delivery and the
    run behind it with one seek per conversation (one statement), then reads the bodies:
    two statements, each conversation's deliveries in acknowledgement order."""
    ids, statements, _ = claim(backlog, {"k3", "k7", "k11"}, limit=10)
    assert len(statements) == 2
    by_key = {"k3": 3, "k7": 7, "k11": 11}
    expected = [n + CONVERSATIONS * step for n in sorted(by_key.values()) for step in range(EACH)]
    assert [int(i.rpartition("-")[2]) for i in ids] == [n + 1 for n in expected]


@pytest.mark.parametrize("keys", [None, {"k1", "k2"}], ids=["every conversation", "by key"])
def test_an_ordered_claim_reads_its_bodies_by_id_not_through_every_pending_delivery(
    backlog: Path, keys: Collection[str] | None
) -> None:
    """The bodies of the deliveries an ordered claim hands out are read by the table's key:
    the plan never walks the state index, which holds every pending delivery of the file."""
    ids, statements, plans = claim(backlog, keys, limit=2)
    assert len(ids) == 2 * EACH
    (bodies,) = [
        plan for statement, plan in zip(statements, plans, strict=True) if "n.body" in statement
    ]
    assert "deliveries_due" not in bodies, bodies
    assert "SEARCH d USING INTEGER PRIMARY KEY" in bodies, bodies
