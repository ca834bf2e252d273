"""The PostgreSQL outbox's hand-over at close and its listener's session, against a real server
(gateway.outbox.postgres): a gateway closing lets go of many leases at once on a table whose
statistics are stale, and the listener keeps its connection on a server that ends idle
sessions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from pglocks import waiting_on_locks

from gateway.config import OutboxConfig
from gateway.outbox import open_outbox
from gateway.outbox.postgres.listener import Listener
from gateway.outbox.postgres.outbox import PostgresOutbox
from gateway.outbox.postgres.sql import CHANNEL

# Leased deliveries of one closing gateway: about what a busy gateway held when the statement
# that lets go of them was found to take 48 s.
LEASED = 13_000
# The outbox's own timeout for a statement (gateway.outbox.postgres.outbox._TIMEOUT_S); the
# release must finish far inside it.
TIMEOUT_S = 5.0
RELEASE_BOUND_S = 2.0


@pytest.fixture
async def gateways(pg_url: str) -> AsyncIterator[list[PostgresOutbox]]:
    """Two gateways' outboxes on one new database; both closed at the end."""
    opened = []
    for _ in range(2):
        outbox = await open_outbox(OutboxConfig(url=pg_url, lease_s=600.0))
        assert isinstance(outbox, PostgresOutbox)
        opened.append(outbox)
    yield opened
    for outbox in opened:
        await outbox.close()


async def _lease_many(pg_url: str, owner: str, count: int) -> None:
    """``count`` pending deliveries to target ``t``, all leased to ``owner`` for ten minutes,
    written at once the way a busy gateway's table grows between two runs of autovacuum: no
    ANALYZE, and autovacuum kept off the table so that none runs during the test either."""
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("ALTER TABLE waba_gateway.deliveries SET (autovacuum_enabled = false)")
        notification = await conn.fetchval(
            "INSERT INTO waba_gateway.notifications (received_at, signature, body)"
            " VALUES (1000, 'sha256=0', '{}') RETURNING id"
        )
        await conn.execute(
            "INSERT INTO waba_gateway.deliveries (notification_id, target, state, created_at,"
            " next_attempt_at, updated_at, lease_owner, lease_until)"
            " SELECT $1, 't', 'pending', 1000, 1000, 1000, $2,"
            " extract(epoch FROM clock_timestamp()) + 600"
            " FROM generate_series(1, $3)",
            notification,
            owner,
            count,
        )
        analyzed = await conn.fetchval(
            "SELECT last_analyze IS NULL AND last_autoanalyze IS NULL"
            " FROM pg_stat_user_tables WHERE relid = 'waba_gateway.deliveries'::regclass"
        )
        assert analyzed, "the table was analyzed: its statistics are not stale"
    finally:
        await conn.close()


async def test_a_gateway_closing_lets_go_of_many_leases_at_once_on_stale_statistics(
    pg_url: str, gateways: list[PostgresOutbox], caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway holding thousands of leases on a freshly grown table (never analyzed) lets go
    of all of them at close, well within the statement timeout, and another gateway claims
    every one of them at once rather than lease_s later."""
    closing, taker = gateways
    await _lease_many(pg_url, closing.owner, LEASED)
    started = time.monotonic()
    await closing.close()
    took = time.monotonic() - started
    assert "could not let go" not in caplog.text
    assert took < RELEASE_BOUND_S, f"close took {took:.1f}s to let go of {LEASED} leases"
    conn = await asyncpg.connect(pg_url)
    try:
        still = await conn.fetchval(
            "SELECT count(*) FROM waba_gateway.deliveries WHERE lease_owner IS NOT NULL"
        )
    finally:
        await conn.close()
    assert still == 0
    claimed = await taker.due(2000.0, {"t": LEASED})
    assert len(claimed) == LEASED


async def test_a_gateway_closing_leaves_what_was_recorded_or_taken_over_while_it_waited(
    pg_url: str, gateways: list[PostgresOutbox], caplog: pytest.LogCaptureFixture
) -> None:
    """The release waits for rows another transaction holds and reads them as they then stand:
    a delivery recorded meanwhile and one another gateway took over are left as that
    transaction made them, and only the gateway's other leases are let go (and counted)."""
    closing, _ = gateways
    await _lease_many(pg_url, closing.owner, 4)
    blocker, watcher = await asyncpg.connect(pg_url), await asyncpg.connect(pg_url)
    try:
        rowids = [
            row[0]
            for row in await watcher.fetch("SELECT id FROM waba_gateway.deliveries ORDER BY id")
        ]
        await blocker.execute("BEGIN")
        await blocker.execute(
            "UPDATE waba_gateway.deliveries SET state = 'delivered', lease_owner = NULL,"
            " lease_until = NULL WHERE id = $1",
            rowids[1],
        )
        await blocker.execute(
            "UPDATE waba_gateway.deliveries SET lease_owner = 'another' WHERE id = $1",
            rowids[2],
        )
        caplog.set_level("INFO", logger="gateway.outbox.postgres.outbox")
        closed = asyncio.create_task(closing.close())
        await waiting_on_locks(watcher, 1)
        await blocker.execute("COMMIT")
        await asyncio.wait_for(closed, 10.0)
        rows = await watcher.fetch(
            "SELECT state, lease_owner, lease_until IS NULL FROM waba_gateway.deliveries"
            " ORDER BY id"
        )
    finally:
        await blocker.close()
        await watcher.close()
    assert [tuple(row) for row in rows] == [
        ("pending", None, True),
        ("delivered", None, True),
        ("pending", "another", False),
        ("pending", None, True),
    ]
    assert "let go of the leases on 2 pending deliveries" in caplog.text


# The server ends a session idle for this long (idle_session_timeout, set for the database).
IDLE_S = 1


async def test_the_listener_keeps_its_connection_when_the_server_ends_idle_sessions(
    pg_url: str,
) -> None:
    """With ``idle_session_timeout`` (and ``idle_in_transaction_session_timeout``) set for the
    database far below the listener's check interval, the listener's connection outlives it
    several times over: the server never ends it, the listener never connects again, and so
    never wakes its dispatcher for what a new connection may have missed (which makes the
    dispatcher drop its runs)."""
    setup = await asyncpg.connect(pg_url)
    try:
        database = await setup.fetchval("SELECT current_database()")
        for setting in ("idle_session_timeout", "idle_in_transaction_session_timeout"):
            await setup.execute(f"ALTER DATABASE {database} SET {setting} = '{IDLE_S}s'")
    finally:
        await setup.close()
    connects = 0
    wakes = 0

    async def connect() -> asyncpg.Connection[Any]:
        nonlocal connects
        connects += 1
        return await asyncpg.connect(pg_url)

    heard = asyncio.Event()

    def woken() -> None:
        nonlocal wakes
        wakes += 1
        heard.set()

    # Checks (SELECT 1) far apart, as the listener's own every 30 s are.
    listener = Listener(connect, woken, timeout_s=2.0, check_s=30.0)
    listener.start()
    try:
        # A session of this database is ended after IDLE_S (the setting holds).
        probe = await asyncpg.connect(pg_url)
        try:
            assert await probe.fetchval("SHOW idle_session_timeout") == f"{IDLE_S}s"
        finally:
            await probe.close()
        await asyncio.sleep(5 * IDLE_S + 0.5)
        assert connects == 1, f"the listener connected {connects} times"
        assert wakes == 0, f"the listener woke its dispatcher {wakes} times"
        # Still listening on its one connection: an announcement is heard.
        announcer = await asyncpg.connect(pg_url)
        try:
            await announcer.execute(f"NOTIFY {CHANNEL}, ''")
        finally:
            await announcer.close()
        await asyncio.wait_for(heard.wait(), 2.0)
        assert wakes == 1
        assert connects == 1
    finally:
        await listener.close()
