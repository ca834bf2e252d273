"""The PostgreSQL outbox when its database fails it, against a real server: a statement the
database does not answer, a server that refuses connections, a session it ends
(gateway.outbox.postgres)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, Unpack

import asyncpg
import pytest
from helpers import OpenOptions
from pgserver import PgServer, running_server

from gateway.config import OutboxConfig
from gateway.errors import OutboxError
from gateway.outbox import Outbox, Route, open_outbox
from gateway.outbox.postgres.listener import Listener
from gateway.outbox.postgres.outbox import PostgresOutbox
from gateway.outbox.postgres.sql import CHANNEL, REPLAYED

SIG = "sha256=" + "0" * 64
T = TypeVar("T")
Opener = Callable[..., Awaitable[Outbox]]
# The outbox's own timeout for a statement (gateway.outbox.postgres.outbox._TIMEOUT_S).
TIMEOUT_S = 5.0


@pytest.fixture
async def opener(pg_url: str) -> AsyncIterator[Opener]:
    """Opens gateways' outboxes on one new database; all are closed at the end."""
    opened: list[Outbox] = []

    async def open_one(lease_s: float = 30.0, **options: Unpack[OpenOptions]) -> Outbox:
        outbox = await open_outbox(OutboxConfig(url=pg_url, lease_s=lease_s), **options)
        opened.append(outbox)
        return outbox

    yield open_one
    for outbox in opened:
        await outbox.close()


async def _until(probe: Callable[[], Awaitable[bool]], what: str, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while not await probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def _renewals(conn: asyncpg.Connection[Any], waiting: bool) -> Callable[[], Awaitable[bool]]:
    """Whether a lease renewal is running (``waiting``: one waits for a lock), or none is."""

    async def probe() -> bool:
        count = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND state = 'active' AND query LIKE '%WITH beat AS%'"
            " AND wait_event_type IS NOT DISTINCT FROM 'Lock'"
        )
        return bool(count) == waiting

    return probe


async def test_a_lease_renewal_that_failed_is_tried_again_before_the_leases_run_out(
    opener: Opener, pg_url: str
) -> None:
    """A lock on the deliveries (an operator's ``VACUUM FULL``, ``LOCK TABLE`` or
    ``REINDEX``) outlasts the outbox's timeout: the heartbeat's renewal fails. The lock gone,
    with time left on the leases, the gateway renews them at once, and another gateway finds
    nothing to claim where they would have run out. Trying again only at its next beat, a
    third of lease_s later, the gateway let them run out first, and the other claimed (and
    sent again) deliveries it was still sending."""
    # A third of the lease, plus the timeout the failing renewal waits, ends after the lease:
    # the beat after the failed one comes too late, a prompt second try in time.
    lease_s = 10.5
    holder = await opener(lease_s=lease_s)
    assert await holder.accept(b'{"n":1}', SIG, [Route("t", None)], 1000.0) is not None
    admin = await asyncpg.connect(pg_url)
    try:
        # Seconds left on the lease the accept took, on the database's clock.
        left = await admin.fetchval(
            "SELECT lease_until - extract(epoch FROM clock_timestamp())"
            " FROM waba_gateway.deliveries"
        )
        started = time.monotonic()
        locker = await asyncpg.connect(pg_url)
        try:
            async with locker.transaction():
                await locker.execute("LOCK TABLE waba_gateway.deliveries IN ACCESS EXCLUSIVE MODE")
                await _until(_renewals(admin, waiting=True), "a renewal held by the lock", 10.0)
                await _until(_renewals(admin, waiting=False), "the renewal to fail", 10.0)
        finally:
            await locker.close()
        expires_in = left - (time.monotonic() - started)
        assert expires_in > 1.0, "the renewal failed too late for the test to mean anything"
        other = await opener(lease_s=lease_s)
        await asyncio.sleep(expires_in + 0.5)
        assert await other.due(5000.0, {"t": 10}) == []
    finally:
        await admin.close()


async def test_a_listener_refused_at_first_reports_what_it_may_have_missed_once_it_listens(
    pg_server: PgServer, pg_url: str
) -> None:
    """The database refuses the listener's first connections (every connection taken, or a
    restart just after the gateway opened its outbox) while another gateway replays a
    delivery: once the listener listens, it wakes its dispatcher and reports a replay of any
    pending delivery, as it does after a connection it lost. Only a connection lost after a
    first one counted before: what was announced before the first LISTEN went unheard, and a
    run holding the replayed delivery in memory sent it at its old place."""
    admin = await asyncpg.connect(pg_url)  # connected before: it may announce meanwhile
    database = await admin.fetchval("SELECT current_database()")
    woken = asyncio.Event()
    replays: list[str] = []
    listener = Listener(
        lambda: asyncpg.connect(pg_url), woken.set, timeout_s=2.0, on_replay=replays.append
    )
    # Set from another database: the server refuses it for the one a session is in.
    allow = "ALTER DATABASE {} ALLOW_CONNECTIONS {}"
    try:
        await asyncio.to_thread(pg_server.psql, allow.format(database, "false"))
        listener.start()
        await asyncio.sleep(0.5)  # refused: "not currently accepting connections"
        await admin.execute(f"NOTIFY {CHANNEL}, '{REPLAYED}7'")  # heard by no one
        await asyncio.to_thread(pg_server.psql, allow.format(database, "true"))
        await asyncio.wait_for(woken.wait(), 10.0)
        assert replays == [""]  # any pending delivery: the one replayed is not known
    finally:
        await listener.close()
        await asyncio.to_thread(pg_server.psql, allow.format(database, "true"))
        await admin.close()


async def test_an_operation_with_no_free_connection_says_the_pool_is_exhausted(
    opener: Opener, pg_url: str
) -> None:
    """A lock holds the deliveries and more operations come than the pool has connections:
    the ones with a connection fail saying the database gave no answer in time, the ones that
    got none saying every connection of the pool was in use, each with its OutboxError (503)
    within the timeout, and the same outbox works once the lock is gone. Both said only
    "TimeoutError" before, which names neither the database nor the pool."""
    box = await opener(dispatching=False)
    locker = await asyncpg.connect(pg_url)
    try:
        async with locker.transaction():
            await locker.execute("LOCK TABLE waba_gateway.deliveries IN ACCESS EXCLUSIVE MODE")
            # Every connection of the pool (ten) held by a count the lock holds.
            first = [asyncio.ensure_future(box.counts()) for _ in range(10)]
            await asyncio.sleep(0.5)
            # Ten of these take the connections the first ten give back at their timeout,
            # and wait for the lock in turn; the rest wait for a connection all along.
            later = [asyncio.ensure_future(box.counts()) for _ in range(15)]
            failed = await asyncio.gather(*first, return_exceptions=True)
            # The rest give up half a second later; the ten with a connection are still held.
            await asyncio.sleep(1.0)
    finally:
        await locker.close()
    assert all(isinstance(exc, OutboxError) for exc in failed), failed
    assert {str(exc) for exc in failed} == {
        f"outbox database unavailable: no answer within {TIMEOUT_S:g} s"
    }
    results = await asyncio.gather(*later, return_exceptions=True)
    counted = [result for result in results if isinstance(result, dict)]
    assert counted == [{"pending": 0, "delivered": 0, "dead": 0}] * 10, results
    waited = {str(result) for result in results if isinstance(result, OutboxError)}
    assert len(results) - len(counted) == 5, results
    assert waited == {
        f"outbox database unavailable: all 10 connections of the pool in use for {TIMEOUT_S:g} s"
    }
    await box.ping()


async def test_a_commit_whose_answer_was_lost_is_stored_once_and_never_lost() -> None:
    """The server commits an accept and its session ends before the answer is sent (here: the
    commit waits for a synchronous standby that never comes, and the session is terminated;
    the transaction has committed locally). On a connection the committer kept, the group
    runs again on a new one and finds its notification stored: a duplicate, answered as
    stored. On a fresh one, the accept fails (503), and Meta's retry of the same body is a
    duplicate. Either way the notification is stored once, and its deliveries are claimed."""
    with running_server() as server:
        server.psql("CREATE DATABASE lost")
        url = server.socket_url("lost")
        admin = await asyncpg.connect(url)
        kept = await open_outbox(OutboxConfig(url=url))
        fresh = await open_outbox(OutboxConfig(url=url))
        try:
            assert await kept.accept(b'{"warm":1}', SIG, [Route("t", None)], 1000.0)
            # Kept connection: run again on a new one, the notification found stored.
            again = kept.accept(b'{"n":1}', SIG, [Route("t", None)], 1001.0)
            assert await _answer_lost(admin, again) is None
            with pytest.raises(OutboxError):  # a fresh connection: 503
                await _answer_lost(admin, fresh.accept(b'{"n":2}', SIG, [Route("t", None)], 1002.0))
            # Meta's retry: a duplicate (its first commit stands).
            assert await fresh.accept(b'{"n":2}', SIG, [Route("t", None)], 1060.0) is None
            bodies = await admin.fetch("SELECT body FROM waba_gateway.notifications")
            assert sorted(bytes(row[0]) for row in bodies) == [
                b'{"n":1}',
                b'{"n":2}',
                b'{"warm":1}',
            ]
            # Leased to the gateway that accepted them, which claims them at its next poll.
            assert len(await kept.due(5000.0, {"t": 10})) == 2
            assert len(await fresh.due(5000.0, {"t": 10})) == 1
        finally:
            await kept.close()
            await fresh.close()
            await admin.close()


async def _answer_lost(admin: asyncpg.Connection[Any], accept: Awaitable[T]) -> T:
    """``accept``, its commit made and then left without an answer: the commit waits for the
    confirmation of a synchronous standby that never comes
    (https://www.postgresql.org/docs/15/warm-standby.html#SYNCHRONOUS-REPLICATION), and its
    session is ended while it waits, PostgreSQL warning that "the transaction has already
    committed locally". Then commits go on without a standby again, a run of the group again
    included."""
    await admin.execute("ALTER SYSTEM SET synchronous_standby_names = 'absent'")
    await admin.execute("SELECT pg_reload_conf()")

    async def taken() -> bool:
        return bool(await admin.fetchval("SELECT current_setting('synchronous_standby_names')"))

    # pg_reload_conf() only asks the postmaster, which signals every backend in turn: once this
    # session has the setting, so has (a moment later) the pool's, before the accept is sent;
    # sent sooner, its commit could go through without waiting for the standby.
    await _until(taken, "the server to take the setting", 10.0)
    await asyncio.sleep(0.2)
    pending = asyncio.ensure_future(accept)

    async def ended() -> bool:
        return bool(
            await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
                " WHERE wait_event = 'SyncRep' AND query LIKE '%accept(%'"
            )
        )

    try:
        await _until(ended, "a commit waiting for the standby", 10.0)
    finally:
        await admin.execute("ALTER SYSTEM RESET synchronous_standby_names")
        await admin.execute("SELECT pg_reload_conf()")
    return await pending


async def test_gateways_starting_at_once_on_an_empty_database_create_its_schema_once(
    pg_url: str,
) -> None:
    """Eight gateways start at once on a new database: one creates the schema (under the
    advisory lock), the others wait for it and read what it made. Every one opens, with the
    same delivery id prefix, over one version row."""
    config = OutboxConfig(url=pg_url)
    boxes = await asyncio.gather(*(open_outbox(config) for _ in range(8)), return_exceptions=True)
    try:
        assert all(isinstance(box, PostgresOutbox) for box in boxes), boxes
        assert len({box._prefix for box in boxes if isinstance(box, PostgresOutbox)}) == 1
    finally:
        for box in boxes:
            if isinstance(box, PostgresOutbox):
                await box.close()
    admin = await asyncpg.connect(pg_url)
    try:
        rows = await admin.fetch("SELECT version FROM waba_gateway.meta")
        assert [tuple(row) for row in rows] == [(7,)]
    finally:
        await admin.close()
