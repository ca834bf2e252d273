"""Reads that share one read transaction fail alone (gateway.outbox.sqlite.writer).

Reads submitted during one turn of the event loop run together in one read transaction: the
dispatcher's claim, the admin API's listings and counts, the readiness and metrics reads. One
of them raising (a value the driver cannot bind) must fail that caller only, as a failing job
of a write group does, not every read that happened to share its transaction.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from gateway.edge.routing import Route
from gateway.errors import OutboxError
from gateway.outbox.sqlite.outbox import SqliteOutbox
from gateway.outbox.sqlite.writer import Writer

SIG = "sha256=" + "0" * 64


def _table(at: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(at, isolation_level=None, check_same_thread=False)
    conn.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER)")
    return conn


def _count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM t").fetchone()[0])


def _broken(conn: sqlite3.Connection) -> int:
    # A lone surrogate, as a name decoded from bytes that were not UTF-8 holds: the driver
    # refuses to bind it.
    return int(conn.execute("SELECT count(*) FROM t WHERE n = ?", ("\udcff",)).fetchone()[0])


async def test_reads_of_one_turn_share_a_transaction_and_the_one_that_raises_fails_alone(
    tmp_path: Path,
) -> None:
    """Three reads submitted in one turn (one group): the middle one raises, and only its
    caller hears of it, with its own error; the other two get their answers."""
    writer = Writer(tmp_path / "reads.sqlite3", _table)
    try:
        await writer.submit(lambda conn: conn.execute("INSERT INTO t VALUES (1), (2)"))
        first = writer.submit(_count, read=True)
        failing = writer.submit(_broken, read=True)
        last = writer.submit(_count, read=True)
        found = await asyncio.gather(first, failing, last, return_exceptions=True)
    finally:
        await writer.close()
    assert found[0] == 2
    assert isinstance(found[1], OutboxError)
    assert "surrogates not allowed" in str(found[1])
    assert found[2] == 2


async def test_a_listing_with_a_bad_target_fails_alone_beside_the_dispatchers_claim(
    tmp_path: Path,
) -> None:
    """The outbox as the gateway uses it: a listing asked for a target no driver can bind,
    made in the same turn as the dispatcher's claim and the counts, fails with its own
    reason; the claim still hands out the due delivery and the counts are read."""
    box = SqliteOutbox(tmp_path / "outbox.sqlite3", dedup_window_s=3600)
    try:
        (stored,) = await box.accept(b'{"n":1}', SIG, [Route("sink", None)], 1.0) or []
        listing, claim, counts = await asyncio.gather(
            box.query(target="\udcff"),
            box.due(10.0, {"sink": 10}),
            box.counts(),
            return_exceptions=True,
        )
        assert isinstance(listing, OutboxError)
        assert "outbox read failed" in str(listing)
        assert not isinstance(claim, BaseException)
        assert [delivery.id for delivery in claim] == [stored.id]
        assert counts == {"pending": 1, "delivered": 0, "dead": 0}
        # The connection is left as it was: the next group of reads runs as usual.
        assert [delivery.id for delivery in await box.query(target="sink")] == [stored.id]
    finally:
        await box.close()


async def test_a_read_that_raises_alone_fails_with_its_reason_and_the_next_reads_run(
    tmp_path: Path,
) -> None:
    """A group of one read that raises: its caller gets the reason once (it is not run
    again), and reads made afterwards are answered."""
    runs: list[int] = []

    def counted_broken(conn: sqlite3.Connection) -> int:
        runs.append(1)
        return _broken(conn)

    writer = Writer(tmp_path / "alone.sqlite3", _table)
    try:
        with pytest.raises(OutboxError, match="surrogates not allowed"):
            await writer.submit(counted_broken, read=True)
        assert await writer.submit(_count, read=True) == 0
    finally:
        await writer.close()
    assert runs == [1]
