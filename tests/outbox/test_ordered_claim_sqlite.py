"""The SQLite outbox's claim for an ordered target, statement by statement: what it reads to
find each conversation's first deliveries and their runs, and how it reads their bodies."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import pytest
from ordered_claims import ordered_claim

from gateway.edge.routing import Route
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


def test_a_claim_by_key_takes_first_deliveries_and_runs_in_one_statement(backlog: Path) -> None:
    """Asked about conversations by key, the claim finds each one's first delivery and the
    run behind it with one seek per conversation (one statement), then reads the bodies:
    two statements, each conversation's deliveries in acknowledgement order."""
    ids, statements, _ = ordered_claim(backlog, {"k3", "k7", "k11"}, limit=10)
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
    ids, statements, plans = ordered_claim(backlog, keys, limit=2)
    assert len(ids) == 2 * EACH
    (bodies,) = [
        plan for statement, plan in zip(statements, plans, strict=True) if "n.body" in statement
    ]
    assert "deliveries_due" not in bodies, bodies
    assert "SEARCH d USING INTEGER PRIMARY KEY" in bodies, bodies
