"""The SQLite outbox's claim for an ordered target, statement by statement: what it reads to
bring the conversations it holds in memory up to the file, and how it reads the bodies of the
first deliveries it hands out."""

from __future__ import annotations

from pathlib import Path

import pytest
from ordered_claims import bodies_read, ordered_claim

from gateway.edge.routing import Route
from gateway.outbox.sqlite.lineup import Lineup
from gateway.outbox.sqlite.outbox import SqliteOutbox

SIG = "sha256=" + "0" * 64
CONVERSATIONS, EACH = 20, 4


@pytest.fixture
async def backlog(tmp_path: Path) -> Path:
    """An outbox file holding EACH pending deliveries of each of CONVERSATIONS conversations
    of the ordered target ``t``, interleaved as they would arrive: row id ``n + 1`` is the
    delivery of notification ``n``, in conversation ``k{n % CONVERSATIONS}``."""
    path = tmp_path / "outbox.sqlite3"
    box = SqliteOutbox(path, dedup_window_s=86400.0)
    for n in range(CONVERSATIONS * EACH):  # one at a time: acknowledgement order is id order
        key = f"k{n % CONVERSATIONS}"
        assert await box.accept(b'{"n":%d}' % n, SIG, [Route("t", None, key)], 1000.0 + n)
    await box.close()
    return path


def _rowids(ids: list[str]) -> list[int]:
    return [int(i.rpartition("-")[2]) for i in ids]


@pytest.mark.parametrize("limit", [1, 3, CONVERSATIONS])
def test_an_ordered_claim_over_a_backlog_reads_only_the_bodies_it_hands_out_by_id(
    backlog: Path, limit: int
) -> None:
    """Over a backlog of every conversation, a claim hands out the first deliveries of the
    first ``limit`` conversations and reads the bodies of those alone, in one statement, by
    the table's key: the plan never walks the state index, which holds every pending
    delivery of the file."""
    ids, statements, plans = ordered_claim(backlog, limit=limit)
    assert _rowids(ids) == list(range(1, limit + 1))
    reads = [
        (bodies_read(statement), plan)
        for statement, plan in zip(statements, plans, strict=True)
        if "body" in statement
    ]
    assert len(reads) == 1, statements
    ((named, plan),) = reads
    assert named is not None
    assert sorted(named) == _rowids(ids)
    assert "deliveries_due" not in plan, plan
    assert "SEARCH d USING INTEGER PRIMARY KEY" in plan, plan


def test_an_ordered_claim_with_every_first_delivery_in_flight_reads_no_body(
    backlog: Path,
) -> None:
    """A claim that finds the first delivery of every conversation in flight (as a
    dispatcher's first claim after a restart may) hands out nothing, neither them nor the
    ones behind them, and reads no body at all; once they are no longer in flight, the next
    claim hands them out."""
    firsts, _, _ = ordered_claim(backlog, limit=CONVERSATIONS)
    assert _rowids(firsts) == list(range(1, CONVERSATIONS + 1))
    lineup = Lineup()
    ids, statements, _ = ordered_claim(backlog, limit=CONVERSATIONS, lineup=lineup, skip=firsts)
    assert ids == []
    assert not [statement for statement in statements if "body" in statement], statements
    ids, _, _ = ordered_claim(backlog, limit=CONVERSATIONS, lineup=lineup)
    assert ids == firsts


def test_only_the_first_ordered_claim_reads_every_pending_delivery_of_the_target(
    backlog: Path,
) -> None:
    """The first claim of a dispatcher reads the target's pending deliveries once, in their
    conversations' order; a later claim with nothing stored since reads the id counter and
    the bodies it hands out, and no other row of the deliveries table."""
    lineup = Lineup()
    first, statements, _ = ordered_claim(backlog, limit=2, lineup=lineup)
    lines = [s for s in statements if "ORDER BY order_key" in s]
    assert len(lines) == 1, statements
    assert "state = 'pending' AND target = 't'" in lines[0], lines
    later, statements, _ = ordered_claim(backlog, limit=2, lineup=lineup, skip=first)
    assert _rowids(later) == [3, 4]
    others = [s for s in statements if bodies_read(s) is None]
    assert others == ["SELECT seq FROM sqlite_sequence WHERE name = 'deliveries'"], statements


async def test_a_later_ordered_claim_reads_the_rows_stored_since_by_id(backlog: Path) -> None:
    """Deliveries stored since the last claim are read as a range of the table's key above the
    last id read, never through the state index (every pending delivery of the target)."""
    lineup = Lineup()
    ordered_claim(backlog, limit=2, lineup=lineup)
    box = SqliteOutbox(backlog, dedup_window_s=86400.0)
    assert await box.accept(b'{"n":"new"}', SIG, [Route("t", None, "new")], 5000.0)
    await box.close()
    _, statements, plans = ordered_claim(backlog, limit=2, lineup=lineup)
    (since,) = [
        p for s, p in zip(statements, plans, strict=True) if "order_key, id" in s and "id >" in s
    ]
    assert "SEARCH deliveries USING INTEGER PRIMARY KEY (rowid>?)" in since, since
    assert "deliveries_due" not in since, since
    assert "TEMP B-TREE" not in since, since
