"""What retention removes from a PostgreSQL outbox, and what it says it removed: delivered
rows and their notifications past ``outbox.retention_s``, dead letters past
``outbox.dead_retention_s`` (gateway.outbox.postgres, gateway.delivery.retention)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from urllib.parse import urlsplit

import asyncpg
import pytest
from helpers import ExpiryCount
from pglocks import waiting_on_locks
from pgserver import PgServer, running_counted_server

from gateway.config import OutboxConfig
from gateway.delivery.reporting import IGNORE
from gateway.delivery.retention import Retention
from gateway.outbox import AttemptResult, DeadLetter, Delivered, Route, open_outbox
from gateway.outbox.postgres import sql

SIG = "sha256=" + "0" * 64


@pytest.fixture(scope="module")
def counting_server() -> Iterator[PgServer]:
    """A server of its own that counts what each statement costs (pg_stat_statements)."""
    with running_counted_server() as server:
        yield server


async def _calls(server: PgServer, pattern: str) -> int:
    """How many times the server ran the statements matching ``pattern`` (LIKE) since the
    counts were reset."""
    conn = await asyncpg.connect(server.socket_url("counted"))
    try:
        found = await conn.fetchval(
            "SELECT COALESCE(SUM(calls), 0) FROM pg_stat_statements WHERE query LIKE $1", pattern
        )
    finally:
        await conn.close()
    return int(found)


async def _rows_read(conn: asyncpg.Connection, table: str, at_least: int) -> int:
    """The rows of ``table`` every scan of the database has read, once the sessions that read
    them have reported them: a session reports its counts when it ends (the outbox closed),
    or on its own schedule; read until they come to ``at_least`` and stop changing."""
    query = (
        "SELECT COALESCE(seq_tup_read, 0) + COALESCE(idx_tup_fetch, 0) FROM pg_stat_user_tables"
        " WHERE schemaname = 'waba_gateway' AND relname = $1"
    )
    last = -1
    for _ in range(150):
        read = int(await conn.fetchval(query, table))
        if read >= at_least and read == last:
            return read
        last = read
        await asyncio.sleep(0.2)
    pytest.fail(f"the server never reported {at_least} rows of {table} read (last: {last})")


async def test_each_step_of_the_notification_prune_is_bounded_however_many_are_still_used(
    counting_server: PgServer,
) -> None:
    """Many old notifications still used by a dead letter, then a few old ones no delivery
    uses, then young ones: the prune removes only the unused old ones, and none of its
    statements reads more than about one batch of notifications. (One statement that looked
    for unused ones among every old notification read all of those still used, each time: with
    a large enough backlog of dead letters it outran the statement timeout at every prune,
    and no notification was ever removed again.)"""
    held, unused = 20 * sql.PRUNE_BATCH, 100
    outbox = await open_outbox(OutboxConfig(url=counting_server.socket_url("counted")))
    conn = await asyncpg.connect(counting_server.socket_url("counted"))
    try:
        await conn.execute(
            "INSERT INTO waba_gateway.notifications (received_at, signature, body)"
            " SELECT CASE WHEN g > $1::integer THEN 5000.0 ELSE 1.0 END, 'sha256=0',"
            " '\\x7b7d'::bytea FROM generate_series(1, $1::integer + 10) AS g",
            held + unused,
        )
        await conn.execute(
            "INSERT INTO waba_gateway.deliveries (notification_id, target, state, attempts,"
            " created_at, next_attempt_at, updated_at, last_error)"
            " SELECT id, 't', 'dead', 1, 1.0, 1.0, 1.0, 'HTTP 400' FROM waba_gateway.notifications"
            " WHERE id <= $1::bigint",
            held,
        )
        await conn.execute("ANALYZE waba_gateway.notifications, waba_gateway.deliveries")
        # What this session read filling the tables is reported before the count starts.
        await conn.execute("SELECT pg_stat_force_next_flush()")
        before = await _rows_read(conn, "notifications", 0)
        counting_server.psql("SELECT pg_stat_statements_reset()", "counted")
        assert await outbox.prune(6000.0, 3600.0, []) == 0
        await outbox.close()  # its sessions end, and report what they read
        # Each used one was read at least once: the prune had to pass it.
        read = await _rows_read(conn, "notifications", before + held) - before
        left = await conn.fetchval("SELECT count(*) FROM waba_gateway.notifications")
        used = await conn.fetchval(
            "SELECT count(DISTINCT notification_id) FROM waba_gateway.deliveries"
        )
    finally:
        await conn.close()
        await outbox.close()
    assert (left, used) == (held + 10, held)
    calls = await _calls(counting_server, "%DELETE FROM waba_gateway.notifications%")
    # A step reads its batch of notifications twice (to find its end, then to remove the unused
    # ones in it): far below the twenty batches of used ones the prune passes.
    assert read / calls <= 3 * sql.PRUNE_BATCH, (read, calls)


async def test_dead_letters_removed_before_a_purge_failed_are_counted_and_said(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """More expired dead letters than one step removes, and the last one locked by another
    transaction until the database gives up waiting: the step before has removed a batch, and
    retention says so (the warning line and the counter) rather than losing the count with the
    failure; the next prune removes the last one once it is free, and counts it alone."""
    database = urlsplit(pg_url).path.lstrip("/")
    conn = await asyncpg.connect(pg_url)
    await conn.execute(f"ALTER DATABASE \"{database}\" SET lock_timeout = '300ms'")
    outbox = await open_outbox(OutboxConfig(url=pg_url))
    holder = await asyncpg.connect(pg_url)
    try:
        count = sql.PRUNE_BATCH + 1
        await conn.execute(
            "INSERT INTO waba_gateway.notifications (received_at, signature, body)"
            " SELECT 1.0, 'sha256=0', '\\x7b7d'::bytea FROM generate_series(1, $1::integer)",
            count,
        )
        # The locked one last in every order a purge may find them in (table, ids, due times,
        # update times): the first step takes the others.
        await conn.execute(
            "INSERT INTO waba_gateway.deliveries (notification_id, target, state, attempts,"
            " created_at, next_attempt_at, updated_at, last_error)"
            " SELECT id, CASE WHEN id = $1 THEN 'z' ELSE 'a' END, 'dead', 1, 1.0, 1.0 + id,"
            " 1.0 + id, 'HTTP 400' FROM waba_gateway.notifications ORDER BY id",
            count,
        )
        await holder.execute("BEGIN")
        await holder.execute("SELECT 1 FROM waba_gateway.deliveries WHERE target = 'z' FOR UPDATE")
        counted = ExpiryCount()
        retention = Retention(outbox, 3600.0, 86400.0, counted)
        with caplog.at_level(logging.WARNING):
            await retention.maybe_prune(200000.0, ["a", "z"])
        left = await conn.fetchval("SELECT count(*) FROM waba_gateway.deliveries")
        assert (left, counted.expired) == (1, sql.PRUNE_BATCH)
        said = [(r.name, r.getMessage()) for r in caplog.records if r.name.startswith("gateway.")]
        assert said == [
            (
                "gateway.outbox.postgres.outbox",
                f"stopped removing expired dead letters after {sql.PRUNE_BATCH}: outbox"
                " database unavailable: canceling statement due to lock timeout",
            ),
            (
                "gateway.delivery.dispatcher",
                f"removed {sql.PRUNE_BATCH} dead letters older than outbox.dead_retention_s"
                " (86400s)",
            ),
        ]
        await holder.execute("ROLLBACK")
        await retention.maybe_prune(200060.0, ["a", "z"])
        assert counted.expired == count
        assert await conn.fetchval("SELECT count(*) FROM waba_gateway.deliveries") == 0
    finally:
        await holder.close()
        await conn.close()
        await outbox.close()


async def test_a_purge_never_removes_a_dead_letter_replayed_while_it_waited(pg_url: str) -> None:
    """A dead letter replayed by a transaction the purge waits for is pending when the purge
    reaches it: it stays, and the purge counts only the two it removed."""
    outbox = await open_outbox(OutboxConfig(url=pg_url))
    replayer, watcher = await asyncpg.connect(pg_url), await asyncpg.connect(pg_url)
    try:
        ids = []
        for n in range(3):
            found = await outbox.accept(b'{"n":%d}' % n, SIG, [Route("t", None)], 1000.0)
            assert found is not None
            ids.append(found[0].id)
            dead = (found[0].id, DeadLetter("HTTP 400"), AttemptResult(status=400))
            await outbox.record_many([dead], 1000.0)
        await replayer.execute("BEGIN")
        await replayer.fetch(sql.REPLAY, int(ids[1].rpartition("-")[2]), 1500.0)
        purge = asyncio.create_task(outbox.purge_dead(1800.0, 2000.0))
        await waiting_on_locks(watcher, 1)  # the purge waits for the replayed row
        await replayer.execute("COMMIT")
        assert await asyncio.wait_for(purge, 10.0) == 2
        assert [d.id for d in await outbox.query(state="pending")] == [ids[1]]
    finally:
        await replayer.close()
        await watcher.close()
        await outbox.close()


async def test_retention_prunes_the_targets_with_delivered_rows_listed_in_one_statement(
    counting_server: PgServer,
) -> None:
    """Ten configured targets, and delivered rows past the retention of one of them and of a
    target removed from the configuration: retention lists the two in one statement and prunes
    those two alone, not the ten configured ones as well. On PostgreSQL each target's prune, and
    each look for the next target with delivered rows, may read every delivery: no index holds
    delivered rows by target."""
    counting_server.psql("CREATE DATABASE targets")
    # Leases long enough that no heartbeat renews them while the statements are counted.
    config = OutboxConfig(url=counting_server.socket_url("targets"), lease_s=3600.0)
    outbox = await open_outbox(config)
    try:
        ids = []
        for n, target in enumerate(("t0", "gone")):
            found = await outbox.accept(b'{"n":%d}' % n, SIG, [Route(target, None)], 1000.0)
            assert found is not None
            ids.append(found[0].id)
            done = (found[0].id, Delivered(), AttemptResult(status=200))
            await outbox.record_many([done], 1000.0)
        counting_server.psql("SELECT pg_stat_statements_reset()", "counted")
        configured = [f"t{n}" for n in range(10)]
        await Retention(outbox, 3600.0, None, IGNORE).maybe_prune(8200.0, configured)
        pruned = await _calls(counting_server, "%target = $1 AND updated_at < $2%")
        every = await _calls(counting_server, "%waba_gateway%")
        assert [await outbox.get(i) for i in ids] == [None, None]
    finally:
        await outbox.close()
    # The list, the two targets' prunes, a step through the notifications and one through the
    # digests.
    assert (pruned, every) == (2, 5)
