"""What only a shared PostgreSQL outbox does: claims with leases across gateways, wake-ups by
NOTIFY, its schema version, and riding out the database going away (gateway.outbox.postgres)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Unpack
from urllib.parse import urlsplit

import asyncpg
import pytest
from claimplan import ordered_claim
from helpers import OpenOptions, eventually, sink_target
from pgserver import PASSWORD, PgServer, running_counted_server, running_server
from sink import Hang, Sink

from gateway.config import DispatcherConfig, OutboxConfig
from gateway.delivery.dispatcher import Dispatcher
from gateway.errors import OutboxError
from gateway.outbox import (
    AttemptResult,
    DeadLetter,
    Delivered,
    Outbox,
    Outcome,
    RetryAt,
    Route,
    open_outbox,
)
from gateway.outbox.postgres import sql
from gateway.outbox.postgres.committer import Committer
from gateway.outbox.postgres.outbox import PostgresOutbox, inspect

SIG = "sha256=" + "0" * 64
Opener = Callable[..., Awaitable[Outbox]]


@pytest.fixture
async def opener(pg_url: str) -> AsyncIterator[Opener]:
    """Opens gateways' outboxes on one new database; all are closed at the end."""
    opened: list[Outbox] = []

    async def open_one(
        lease_s: float = 30.0, url: str = pg_url, **options: Unpack[OpenOptions]
    ) -> Outbox:
        config = OutboxConfig(url=url, lease_s=lease_s)
        outbox = await open_outbox(config, **options)
        opened.append(outbox)
        return outbox

    yield open_one
    for outbox in opened:
        await outbox.close()


async def _until_listening(pg_server: PgServer, pg_url: str) -> None:
    """Until a session of the database listens (the outbox's listener): a NOTIFY sent before
    would be heard by no one."""
    database = urlsplit(pg_url).path.lstrip("/")
    listens = (
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND query LIKE 'LISTEN%'"
    )

    async def listening() -> bool:
        return int(await asyncio.to_thread(pg_server.psql, listens, database)) >= 1

    await eventually(listening, "the listener's LISTEN")


async def _die(box: Outbox) -> None:
    """``box``'s gateway dies (SIGKILL, a crash, a stall past its lease): its heartbeat stops
    and its connections go, without the clean close that lets go of its leases, which stay
    until they run out."""
    assert isinstance(box, PostgresOutbox)
    if box._heartbeat is not None:
        box._heartbeat.cancel()
    if box._listener is not None:
        await box._listener.close()
    box._closed = True
    box._pool.terminate()


async def _store(outbox: Outbox, count: int, target: str = "t") -> list[str]:
    ids = []
    for n in range(count):
        found = await outbox.accept(b'{"n":%d}' % n, SIG, [Route(target, None)], 1000.0)
        assert found is not None
        ids.append(found[0].id)
    return ids


async def test_concurrent_claims_by_two_gateways_never_share_a_delivery(opener: Opener) -> None:
    """Two dispatchers claiming at once get disjoint deliveries, together all of them."""
    writer = await opener(dispatching=False)
    ids = await _store(writer, 40)
    # Each gateway's own leases are its own to claim again (it excludes what is in flight):
    # four gateways, one claim each.
    boxes = [await opener() for _ in range(4)]
    claims = await asyncio.gather(*(box.due(2000.0, {"t": 15}) for box in boxes))
    claimed = [d.id for claim in claims for d in claim]
    assert len(claimed) == len(set(claimed)) == 40
    assert sorted(claimed) == sorted(ids)


async def test_a_gateway_leases_what_it_accepts_so_no_other_claims_it(opener: Opener) -> None:
    """A dispatching gateway's fresh deliveries are its own: another's claim skips them."""
    accepting, other = await opener(), await opener()
    ids = await _store(accepting, 3)
    assert await other.due(2000.0, {"t": 10}) == []
    assert sorted(d.id for d in await accepting.due(2000.0, {"t": 10})) == sorted(ids)


async def test_claims_of_a_gateway_that_stops_renewing_are_taken_over_after_the_lease(
    opener: Opener, pg_url: str
) -> None:
    """A dead gateway's claims (no heartbeat) pass to another once lease_s has run out; the
    dead one's late outcome no longer counts."""
    dead = await opener(lease_s=0.5)
    assert isinstance(dead, PostgresOutbox)
    ids = await _store(dead, 2)
    claimed = await dead.due(2000.0, {"t": 10})
    await _die(dead)
    survivor = await opener(lease_s=0.5)
    assert await survivor.due(2000.0, {"t": 10}) == []
    await asyncio.sleep(0.6)
    taken = await survivor.due(2000.0, {"t": 10})
    assert sorted(d.id for d in taken) == sorted(ids)
    late = await opener(lease_s=0.5, url=pg_url)
    assert isinstance(late, PostgresOutbox)
    late.owner = dead.owner  # the dead gateway's outcome, arriving after the takeover
    await late.record_many([(claimed[0].id, Delivered(), AttemptResult(status=200))], 2001.0)
    assert (await survivor.counts())["delivered"] == 0


@pytest.mark.parametrize(
    ("taker", "late"),
    [
        (Delivered(), DeadLetter("HTTP 400")),
        (RetryAt(2500.0, "HTTP 503"), Delivered()),
    ],
    ids=["after-a-delivery", "after-a-retry"],
)
async def test_a_stalled_gateways_late_outcome_never_overwrites_the_one_the_taker_recorded(
    opener: Opener, pg_url: str, taker: Outcome, late: Outcome
) -> None:
    """A gateway stalled past its lease (a paused machine, a long pause of its process) comes
    back with its outcome after another gateway took the delivery over and recorded its own,
    which ended the lease: the late outcome is not recorded, neither over a delivery nor over
    a retry the taker holds no lease on any more, and counts no attempt."""
    stalled = await opener(lease_s=0.5)
    assert isinstance(stalled, PostgresOutbox)
    (stored,) = await _store(stalled, 1)
    (claimed,) = await stalled.due(2000.0, {"t": 10})
    await _die(stalled)  # its heartbeat stops, as a stall stops it
    survivor = await opener(lease_s=0.5)
    await asyncio.sleep(0.6)
    (taken,) = await survivor.due(2000.0, {"t": 10})
    assert taken.id == stored
    await survivor.record_many(
        [(taken.id, taker, AttemptResult(status=200))], 2001.0, {taken.id: taken.created_at}
    )
    recorded = await survivor.get(stored)
    assert recorded is not None
    back = await opener(lease_s=0.5, url=pg_url)
    assert isinstance(back, PostgresOutbox)
    back.owner = stalled.owner  # the stalled gateway, running again
    await back.record_many(
        [(claimed.id, late, AttemptResult(status=400))], 2002.0, {claimed.id: claimed.created_at}
    )
    after = await survivor.get(stored)
    assert after is not None
    assert (after.state, after.attempts, after.last_status) == (recorded.state, 1, 200)
    assert len(await survivor.attempts(stored)) == 1


async def test_a_living_gateway_keeps_its_claims_past_the_lease(opener: Opener) -> None:
    """The heartbeat renews the leases of a gateway that lives, however slow its target."""
    # Leases of a second, outlived two and a half times over: long enough that a heartbeat
    # delayed by a loaded machine still lands in time, short enough to keep the test quick.
    slow = await opener(lease_s=1.0)
    await _store(slow, 2)
    await slow.due(2000.0, {"t": 10})
    other = await opener(lease_s=1.0)
    await asyncio.sleep(2.5)
    assert await other.due(2000.0, {"t": 10}) == []


async def test_an_outcome_ends_the_lease_so_any_gateway_retries(opener: Opener) -> None:
    """A failed attempt, recorded, leaves the retry to whichever gateway claims first."""
    first, second = await opener(), await opener()
    (delivery_id,) = await _store(first, 1)
    await first.record_many(
        [(delivery_id, RetryAt(1500.0, "HTTP 503"), AttemptResult(status=503))], 1001.0
    )
    (retry,) = await second.due(2000.0, {"t": 10})
    assert (retry.id, retry.attempts) == (delivery_id, 1)


async def test_deliveries_stored_unleased_wake_other_gateways_at_once(
    opener: Opener, pg_server: PgServer, pg_url: str
) -> None:
    """A notification stored by a gateway that does not dispatch, or a replay, wakes the
    dispatchers of the others through NOTIFY, without waiting for their poll."""
    woken = asyncio.Event()
    await opener(on_wake=woken.set)
    writer = await opener(dispatching=False)
    await _until_listening(pg_server, pg_url)  # a NOTIFY before it is not heard
    (delivery_id,) = await _store(writer, 1)
    await asyncio.wait_for(woken.wait(), 5.0)
    woken.clear()
    assert await writer.replay(delivery_id, 1001.0)
    await asyncio.wait_for(woken.wait(), 5.0)


async def test_new_database_gets_the_schema_and_check_reports_its_version(
    opener: Opener, pg_server: PgServer, pg_url: str
) -> None:
    """The first start creates the schema at version 7; inspect() (check) says so."""
    config = OutboxConfig(url=pg_url)
    assert "its schema is created at the first start" in await inspect(config)
    await opener()
    assert "reachable, schema version 7" in await inspect(config)
    database = urlsplit(pg_url).path.lstrip("/")
    assert pg_server.psql("SELECT version FROM waba_gateway.meta", database) == "7"


async def test_schema_of_version_1_is_migrated_in_place_keeping_its_deliveries(
    opener: Opener, pg_server: PgServer, pg_url: str
) -> None:
    """A version 1 database (no conversation order, no buckets) is brought to version 7 at
    start; its pending deliveries stay, unkeyed, and are claimed as before."""
    first = await opener(dispatching=False)
    ids = await _store(first, 2)
    await first.close()
    database = urlsplit(pg_url).path.lstrip("/")
    pg_server.psql(
        "DROP TABLE waba_gateway.buckets; DROP INDEX waba_gateway.deliveries_order;"
        " ALTER TABLE waba_gateway.deliveries DROP COLUMN order_key, DROP COLUMN position;"
        " ALTER TABLE waba_gateway.notifications DROP COLUMN trace;"
        " ALTER TABLE waba_gateway.deliveries DROP COLUMN held_s;"
        " UPDATE waba_gateway.meta SET version = 1",
        database,
    )
    again = await opener()
    assert pg_server.psql("SELECT version FROM waba_gateway.meta", database) == "7"
    claimed = await again.due(2000.0, {"t": 10}, ordered={"t"})
    assert sorted(d.id for d in claimed) == sorted(ids)
    assert await again.take_tokens("t", 1.0, 1, 5) == 1


async def test_schema_of_version_2_gains_the_trace_column_keeping_its_deliveries(
    opener: Opener, pg_server: PgServer, pg_url: str
) -> None:
    """A version 2 database (no trace context) is brought to version 7 at start; its pending
    deliveries stay, with no trace context, and new ones keep theirs."""
    first = await opener(dispatching=False)
    ids = await _store(first, 2)
    await first.close()
    database = urlsplit(pg_url).path.lstrip("/")
    pg_server.psql(
        "ALTER TABLE waba_gateway.notifications DROP COLUMN trace;"
        " ALTER TABLE waba_gateway.deliveries DROP COLUMN held_s;"
        " UPDATE waba_gateway.meta SET version = 2",
        database,
    )
    again = await opener()
    assert pg_server.psql("SELECT version FROM waba_gateway.meta", database) == "7"
    claimed = await again.due(2000.0, {"t": 10})
    assert sorted(d.id for d in claimed) == sorted(ids)
    assert {d.trace for d in claimed} == {None}


async def test_schema_of_version_3_gains_the_held_time_keeping_its_deliveries(
    opener: Opener, pg_server: PgServer, pg_url: str
) -> None:
    """A version 3 database (no held time) is brought to version 7 at start; its pending
    deliveries stay, having been held for no time, and a retry keeps the time it carries."""
    first = await opener(dispatching=False)
    ids = await _store(first, 2)
    await first.close()
    database = urlsplit(pg_url).path.lstrip("/")
    pg_server.psql(
        "ALTER TABLE waba_gateway.deliveries DROP COLUMN held_s;"
        " UPDATE waba_gateway.meta SET version = 3",
        database,
    )
    again = await opener()
    assert pg_server.psql("SELECT version FROM waba_gateway.meta", database) == "7"
    claimed = await again.due(2000.0, {"t": 10})
    assert sorted(d.id for d in claimed) == sorted(ids)
    assert {d.held_s for d in claimed} == {0.0}
    retry = RetryAt(2100.0, "HTTP 503", 42.5)
    await again.record_many([(ids[0], retry, AttemptResult(status=503))], 2001.0)
    held = await again.get(ids[0])
    assert held is not None
    assert held.held_s == 42.5


async def test_the_ordered_claim_finds_an_earlier_pending_delivery_through_the_index(
    opener: Opener, pg_server: PgServer, pg_url: str
) -> None:
    """The ordered claim's NOT EXISTS (an earlier pending delivery of the conversation) is
    answered by the partial index of keyed pending rows, not by reading the table: the plan
    of the statement as the outbox runs it (sequential scans ruled out, so a plan without an
    index there would say so)."""
    await opener()
    database = urlsplit(pg_url).path.lstrip("/")
    statement = ordered_claim("t", 2000.0, 10)
    plan = pg_server.psql(f"SET enable_seqscan = off; EXPLAIN {statement}", database)
    # The part for targets with order = "conversation" (mode 1), up to the next one's.
    part = plan.split("Filter: (mode = 1)", 1)[1].split("Filter: (mode = 2)", 1)[0]
    assert "deliveries_order" in part.split("SubPlan", 1)[1], plan
    assert "Seq Scan" not in plan, plan


async def test_schema_of_a_newer_version_is_refused_at_start_untouched(
    opener: Opener, pg_server: PgServer, pg_url: str
) -> None:
    """A schema made by a newer gateway is refused with what to do; nothing is changed."""
    await (await opener()).close()
    database = urlsplit(pg_url).path.lstrip("/")
    pg_server.psql("UPDATE waba_gateway.meta SET version = 8", database)
    with pytest.raises(OutboxError, match=r"newer version.*\(schema version 8, this"):
        await opener()
    with pytest.raises(OutboxError, match="schema version 8"):
        await inspect(OutboxConfig(url=pg_url))
    assert pg_server.psql("SELECT version FROM waba_gateway.meta", database) == "8"


async def test_schema_that_is_not_an_outbox_is_refused(
    opener: Opener, pg_server: PgServer, pg_url: str
) -> None:
    """A waba_gateway schema without a recorded version is not taken for an outbox."""
    database = urlsplit(pg_url).path.lstrip("/")
    pg_server.psql("CREATE SCHEMA waba_gateway", database)
    with pytest.raises(OutboxError, match="not a waba-gateway outbox"):
        await opener()


async def test_unreachable_database_at_start_names_the_url_without_its_password(
    pg_server: PgServer,
) -> None:
    """Nothing listening: OutboxError naming outbox.url, password redacted."""
    url = pg_server.tcp_url().replace(f":{pg_server.port}/", ":9/")
    with pytest.raises(OutboxError) as caught:
        await open_outbox(OutboxConfig(url=url))
    assert str(caught.value).startswith("outbox.url = 'postgresql://waba:***@127.0.0.1:9/")
    assert "cannot connect" in str(caught.value)
    assert PASSWORD not in str(caught.value)


async def test_tcp_url_with_a_password_opens(pg_server: PgServer, pg_url: str) -> None:
    """The postgresql://USER:PASSWORD@HOST:PORT/DB form works as well as the socket one."""
    database = urlsplit(pg_url).path.lstrip("/")
    outbox = await open_outbox(OutboxConfig(url=pg_server.tcp_url(database)))
    try:
        await outbox.ping()
    finally:
        await outbox.close()


async def test_database_going_away_fails_fast_and_recovers_without_reopening() -> None:
    """Server stopped: accept and ping raise OutboxError within seconds (503, never 200).
    Server back: the same outbox takes notifications again, and what it had is still there."""
    with running_server() as server:
        server.psql("CREATE DATABASE away")
        woken = asyncio.Event()
        outbox = await open_outbox(OutboxConfig(url=server.socket_url("away")), on_wake=woken.set)
        try:
            (kept,) = await _store(outbox, 1)
            await asyncio.to_thread(server.stop)
            started = time.monotonic()
            with pytest.raises(OutboxError):
                await outbox.accept(b'{"x":1}', SIG, [Route("t", None)], 1001.0)
            with pytest.raises(OutboxError):
                await outbox.ping()
            assert time.monotonic() - started < 5.0
            await asyncio.to_thread(server.start)
            # The listener is back and says so; the bound is generous, as a loaded machine restarts
            # PostgreSQL slowly (the wait ends as soon as it is back).
            await asyncio.wait_for(woken.wait(), 30.0)
            assert await outbox.accept(b'{"x":1}', SIG, [Route("t", None)], 1002.0)
            await outbox.ping()
            assert kept in {d.id for d in await outbox.query()}
        finally:
            await outbox.close()


async def test_kept_connections_the_server_ended_are_replaced_without_failing_a_group(
    opener: Opener, pg_server: PgServer, pg_url: str
) -> None:
    """The server ends the gateway's connections between two group commits (a restart, a
    failover, an idle timeout): the next accept and the next outcomes run on new connections.
    Failed instead, the accept would be answered 503 and the outcome lost, its delivery sent
    again."""
    box = await opener()
    first, second = await _store(box, 2)
    ok = AttemptResult(status=200)
    await box.record_many([(first, Delivered(), ok)], 1001.0)  # the recorder keeps one too
    # Ended, and waited for (up to 5 s each): none is left half gone for the next group.
    ended = pg_server.psql(
        "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()",
        urlsplit(pg_url).path.lstrip("/"),
    )
    assert int(ended) >= 2
    assert await box.accept(b'{"after":1}', SIG, [Route("t", None)], 1002.0) is not None
    await box.record_many([(second, Delivered(), ok)], 1003.0)
    delivered = await box.query(state="delivered")
    # Each outcome counted once: a record runs again only when it was never sent.
    assert {(d.id, d.attempts) for d in delivered} == {(first, 1), (second, 1)}


async def test_a_group_of_accepts_the_database_does_not_answer_fails_whole_within_the_timeout(
    opener: Opener, pg_url: str
) -> None:
    """The database does not answer a group commit (an operator's ``LOCK TABLE``, ``VACUUM
    FULL`` or ``REINDEX`` holds the notifications, or the server hangs): every accept of the
    group gets its OutboxError (the request's 503) once, within the outbox's timeout. Run
    again one at a time, each with a timeout of its own, a group of six was answered only
    after seven timeouts."""
    box = await opener()
    warm = [box.accept(b'{"warm":%d}' % n, SIG, [Route("t", None)], 1000.0) for n in range(6)]
    await asyncio.gather(*warm)  # the committer's connections are open
    locker = await asyncpg.connect(pg_url)
    try:
        async with locker.transaction():
            await locker.execute("LOCK TABLE waba_gateway.notifications IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            results = await asyncio.gather(
                *(box.accept(b'{"n":%d}' % n, SIG, [Route("t", None)], 1001.0) for n in range(6)),
                return_exceptions=True,
            )
            took = time.monotonic() - started
    finally:
        await locker.close()
    assert all(isinstance(result, OutboxError) for result in results), results
    # The timeout (5 s), and slack for a loaded machine: far below a second timeout.
    assert took < 8.0, f"answered after {took:.1f} s"
    assert await box.accept(b'{"after":1}', SIG, [Route("t", None)], 1002.0) is not None


async def test_a_submission_the_database_refuses_fails_alone_and_its_group_commits(
    opener: Opener,
) -> None:
    """One accept of a group carries a value the database refuses (a trace context with a NUL
    character, which no text column holds): it alone fails; the others of its group are
    stored."""
    box = await opener()
    results = await asyncio.gather(
        *(
            box.accept(
                b'{"n":%d}' % n, SIG, [Route("t", None)], 1000.0, "bad\x00" if n == 1 else None
            )
            for n in range(4)
        ),
        return_exceptions=True,
    )
    assert isinstance(results[1], OutboxError)
    stored = [result for n, result in enumerate(results) if n != 1]
    assert all(isinstance(result, list) and len(result) == 1 for result in stored), results
    assert (await box.counts())["pending"] == 3


async def test_a_body_committed_out_of_order_is_new_outside_the_window(opener: Opener) -> None:
    """Gateways commit concurrently, so a later request may be stored first: the earlier one
    is a duplicate only inside dedup_window_s of it, as in time order."""
    box = await opener()
    assert isinstance(box, PostgresOutbox)
    window = box.config.dedup_window_s
    assert await box.accept(b"{}", SIG, [Route("t", None)], 10 * window)
    assert await box.accept(b"{}", SIG, [Route("t", None)], 10 * window - 1.0) is None
    assert await box.accept(b"{}", SIG, [Route("t", None)], 8 * window)


async def test_one_body_several_times_in_one_group_commit_is_decided_in_turn(
    opener: Opener,
) -> None:
    """The same bytes several times in one group commit: each is a duplicate of the one
    stored before it inside dedup_window_s, and new outside it, as in separate commits."""
    box = await opener()
    assert isinstance(box, PostgresOutbox)
    window = box.config.dedup_window_s
    times = [10 * window, 10 * window + 1.0, 12 * window, 12 * window + 1.0]
    results = await asyncio.gather(
        *(box.accept(b'{"same":1}', SIG, [Route("t", None)], at) for at in times)
    )
    assert [found is not None for found in results] == [True, False, True, False]
    assert (await box.counts())["pending"] == 2


async def test_schema_of_version_4_gains_the_group_accept_keeping_its_deliveries(
    opener: Opener, pg_server: PgServer, pg_url: str
) -> None:
    """A version 4 database (no accept function) is brought to version 7 at start; its
    pending deliveries stay and new notifications are accepted after them."""
    first = await opener(dispatching=False)
    ids = await _store(first, 2)
    await first.close()
    database = urlsplit(pg_url).path.lstrip("/")
    pg_server.psql(
        "DROP FUNCTION waba_gateway.accept; UPDATE waba_gateway.meta SET version = 4", database
    )
    again = await opener(dispatching=False)
    assert pg_server.psql("SELECT version FROM waba_gateway.meta", database) == "7"
    later = await again.accept(b'{"n":"later"}', SIG, [Route("t", None)], 1000.0)
    assert later is not None
    claimed = await again.due(2000.0, {"t": 10})
    assert sorted(d.id for d in claimed) == sorted([*ids, later[0].id])


# Version 5's index of every delivery, for its claims and its prune.
_OLD_CLAIMS_INDEX = (
    "DROP INDEX waba_gateway.deliveries_due; CREATE INDEX deliveries_due"
    " ON waba_gateway.deliveries (state, target, next_attempt_at);"
    " UPDATE waba_gateway.meta SET version = 5"
)


def _index_definitions(server: PgServer, database: str) -> str:
    return server.psql(
        "SELECT string_agg(indexdef, E'\\n' ORDER BY indexname) FROM pg_indexes"
        " WHERE schemaname = 'waba_gateway'",
        database,
    )


async def _migrated_from(
    opener: Opener, pg_server: PgServer, pg_url: str, older: str, new_index: str
) -> Outbox:
    """The outbox of ``pg_url`` opened again after ``older`` (statements) took it back to an
    older version: checked to be at the current version with exactly the indexes of a new
    database, which hold ``new_index``."""
    database = urlsplit(pg_url).path.lstrip("/")
    fresh = await opener(url=pg_url.replace(f"/{database}?", "/postgres?"))
    await fresh.close()
    expected = _index_definitions(pg_server, "postgres")
    assert new_index in expected
    pg_server.psql(older, database)
    again = await opener()
    assert pg_server.psql("SELECT version FROM waba_gateway.meta", database) == "7"
    assert _index_definitions(pg_server, database) == expected
    return again


async def test_schema_of_version_5_keeps_only_pending_deliveries_in_the_claims_index(
    opener: Opener, pg_server: PgServer, pg_url: str
) -> None:
    """A version 5 database (every delivery in the claims' index) is brought to version 7 at
    start with the indexes of a new one: its pending deliveries are claimed as before, and its
    old delivered ones are pruned through the index of update times."""
    first = await opener()
    ids = await _store(first, 3)  # leased to it: its outcomes count
    await first.record_many([(ids[0], Delivered(), AttemptResult(status=200))], 1001.0)
    await first.record_many(
        [(i, RetryAt(1500.0, "HTTP 503"), AttemptResult(status=503)) for i in ids[1:]], 1001.0
    )
    await first.close()
    again = await _migrated_from(
        opener, pg_server, pg_url, _OLD_CLAIMS_INDEX, "WHERE (state <> 'delivered'::text)"
    )
    claimed = await again.due(2000.0, {"t": 10})
    assert sorted(d.id for d in claimed) == sorted(ids[1:])
    assert await again.prune(1001.0 + 60.0, 30.0, ["t"]) == 1
    assert await again.get(ids[0]) is None


# Version 6's conversation index, without each delivery's place.
_OLD_CONVERSATION_INDEX = (
    "DROP INDEX waba_gateway.deliveries_order; CREATE INDEX deliveries_order"
    " ON waba_gateway.deliveries (target, order_key)"
    " WHERE state = 'pending' AND order_key IS NOT NULL;"
    " UPDATE waba_gateway.meta SET version = 6"
)


async def test_schema_of_version_6_gains_each_deliverys_place_in_the_conversation_index(
    opener: Opener, pg_server: PgServer, pg_url: str
) -> None:
    """A version 6 database (its conversation index by target and key alone) is brought to
    version 7 at start with the indexes of a new one: its pending keyed deliveries are claimed
    as before, the first of each conversation only, and the next once that one is delivered."""
    first = await opener(dispatching=False)
    ids = []
    for n in range(4):
        key = "k1" if n < 3 else "k2"
        found = await first.accept(b'{"n":%d}' % n, SIG, [Route("t", None, key)], 1000.0)
        assert found is not None
        ids.append(found[0].id)
    await first.close()
    again = await _migrated_from(
        opener,
        pg_server,
        pg_url,
        _OLD_CONVERSATION_INDEX,
        '(target, order_key, COALESCE("position", id))',
    )
    claimed = await again.due(2000.0, {"t": 10}, ordered={"t"})
    assert sorted(d.id for d in claimed) == sorted([ids[0], ids[3]])
    await again.record_many([(ids[0], Delivered(), AttemptResult(status=200))], 2001.0)
    following = await again.due(2002.0, {"t": 10}, exclude={ids[3]}, ordered={"t"})
    assert [d.id for d in following] == [ids[1]]


async def test_outcomes_recorded_by_many_batches_at_once_are_one_statement(
    opener: Opener, counting_server: PgServer
) -> None:
    """Twenty batches of one outcome each, recorded at once (as twenty exchanges end together),
    reach the server as one statement, each attempt with its own time."""
    counting_server.psql("CREATE DATABASE batches")  # the server counts every database's
    box = await opener(url=counting_server.socket_url("batches"))
    stored = await asyncio.gather(
        *(box.accept(b'{"r":%d}' % n, SIG, [Route("t", None)], 1000.0) for n in range(20))
    )
    ids = [d.id for found in stored for d in found or []]
    ok = AttemptResult(status=200)
    counting_server.psql("SELECT pg_stat_statements_reset()", "counted")
    await asyncio.gather(
        *(box.record_many([(i, Delivered(), ok)], 1001.0 + n) for n, i in enumerate(ids))
    )
    assert _statements_since_reset(counting_server) == 1
    for n, delivery_id in enumerate(ids):
        (attempt,) = await box.attempts(delivery_id)
        assert (attempt.state, attempt.at) == ("delivered", 1001.0 + n)


async def test_a_group_that_fails_outside_the_drivers_errors_is_answered_not_left_waiting(
    pg_url: str,
) -> None:
    """A group whose run raises something the committer does not expect from the driver
    answers every submission with OutboxError; none is left waiting."""

    async def run(conn: object, group: list[tuple[object, ...]]) -> list[object]:
        raise RuntimeError("unexpected")

    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=2)
    committer = Committer(pool, run, timeout_s=5.0)
    try:
        futures = [committer.submit((n,)) for n in range(3)]
        for future in futures:
            with pytest.raises(OutboxError, match="unexpected"):
                await asyncio.wait_for(future, 5.0)
    finally:
        await committer.close()
        await pool.close()


async def test_group_commits_keep_their_connection_instead_of_the_pools_each_time(
    opener: Opener,
) -> None:
    """One group after another commits on the connection the first took from the pool: it
    stays out of the pool while the outbox is open, and goes back when it closes."""
    box = await opener()
    assert isinstance(box, PostgresOutbox)
    pool = box._pool
    for n in range(5):
        assert await box.accept(b'{"k":%d}' % n, SIG, [Route("t", None)], 1000.0) is not None
        await asyncio.sleep(0.05)  # past the group's end, when a connection would go back
        assert pool.get_size() - pool.get_idle_size() == 1
    await box.close()
    assert pool.get_idle_size() == pool.get_size()


async def test_the_outboxs_statements_are_never_compiled_by_jit(
    opener: Opener, pg_url: str
) -> None:
    """A database set to compile every statement (``jit_above_cost = 0``): a statement on
    another connection is compiled, one on the outbox's connections is not, whatever the
    database's settings (compiling a claim at each execution cost more than running it)."""
    admin = await asyncpg.connect(pg_url)
    try:
        name = await admin.fetchval("SELECT current_database()")
        await admin.execute(f'ALTER DATABASE "{name}" SET jit_above_cost = 0')
        box = await opener()
        assert isinstance(box, PostgresOutbox)
        await _store(box, 3)
        probe = "EXPLAIN (ANALYZE, FORMAT JSON) SELECT sum(id) FROM waba_gateway.deliveries"
        other = await asyncpg.connect(pg_url)  # a new session: it takes the database's setting
        try:
            assert "JIT" in json.loads(await other.fetchval(probe))[0]
        finally:
            await other.close()
        async with box._pool.acquire() as conn:
            assert "JIT" not in json.loads(await conn.fetchval(probe))[0]
    finally:
        await admin.close()


@pytest.fixture(scope="module")
def counting_server() -> Iterator[PgServer]:
    """A server of its own that counts the statements it runs (pg_stat_statements)."""
    with running_counted_server() as server:
        yield server


def _statements_since_reset(server: PgServer) -> int:
    """The outbox's statements and the pool's session resets the server ran since the counts
    were last reset (not the driver's own reading of types, once per connection)."""
    return int(
        server.psql(
            "SELECT COALESCE(SUM(calls), 0) FROM pg_stat_statements WHERE query ~"
            " 'waba_gateway|pg_advisory_unlock_all|CLOSE ALL|UNLISTEN|RESET ALL'",
            "counted",
        )
    )


async def test_a_group_commit_and_a_batch_of_outcomes_are_one_statement_each(
    opener: Opener, counting_server: PgServer
) -> None:
    """Twenty accepts in one group commit reach the server as one statement and nothing
    else (not one each, no session reset when the connection goes back to the pool); so do
    the outcomes of twenty attempts recorded together."""
    box = await opener(url=counting_server.socket_url("counted"))
    ok = AttemptResult(status=200)
    counting_server.psql("SELECT pg_stat_statements_reset()", "counted")
    stored = await asyncio.gather(
        *(box.accept(b'{"n":%d}' % n, SIG, [Route("t", None)], 1000.0) for n in range(20))
    )
    assert _statements_since_reset(counting_server) == 1
    counting_server.psql("SELECT pg_stat_statements_reset()", "counted")
    await box.record_many(
        [(d.id, Delivered(), ok) for found in stored for d in found or []], 1001.0
    )
    assert _statements_since_reset(counting_server) == 1
    assert (await box.counts())["delivered"] == 20


async def test_one_delivery_twice_in_a_batch_of_outcomes_is_two_attempts_in_order(
    opener: Opener,
) -> None:
    """Two outcomes of one delivery recorded together count as two attempts, the later one
    deciding its state."""
    box = await opener()
    (delivery,) = await box.accept(b'{"n":1}', SIG, [Route("t", None)], 1000.0) or []
    await box.record_many(
        [
            (delivery.id, RetryAt(1100.0, "HTTP 503", 0.0), AttemptResult(status=503)),
            (delivery.id, Delivered(), AttemptResult(status=200)),
        ],
        1001.0,
    )
    found = await box.get(delivery.id)
    assert found is not None
    assert found.state == "delivered"
    assert [a.status for a in await box.attempts(delivery.id)] == [503, 200]


async def test_a_claim_across_targets_and_their_runs_is_one_statement(
    opener: Opener, counting_server: PgServer
) -> None:
    """A claim for a target in any order, one keeping conversations in order with runs, and
    one asked for named conversations only reaches the server as one statement, and answers
    as each would alone: each target's oldest first, every run behind its first delivery."""
    url = counting_server.socket_url("counted")
    writer = await opener(url=url, dispatching=False)
    plain = []
    for n in range(3):  # bodies of their own: the database is the module's
        found = await writer.accept(b'{"plain":%d}' % n, SIG, [Route("plain", None)], 1000.0)
        assert found is not None
        plain.append(found[0].id)
    keyed = []
    for n in range(6):
        for target in ("ordered", "named"):
            route = Route(target, None, f"k{n % 2}")
            found = await writer.accept(b'{"%s":%d}' % (target.encode(), n), SIG, [route], 1000.0)
            assert found is not None
            keyed.append(found[0])
    box = await opener(url=url)
    counting_server.psql("SELECT pg_stat_statements_reset()", "counted")
    claimed = await box.due(
        2000.0,
        {"plain": 2, "ordered": 5, "named": 5},
        ordered={"ordered", "named"},
        conversations={"named": ["k1"]},
        runs={"ordered": 2},
    )
    assert _statements_since_reset(counting_server) == 1
    ordered = [d.id for d in keyed if d.target == "ordered"]
    named = [d.id for d in keyed if d.target == "named"]
    by_target = {t: [d.id for d in claimed if d.target == t] for t in ("plain", "ordered", "named")}
    assert by_target == {
        "plain": plain[:2],
        # Each conversation's first, and the one after it (runs of two).
        "ordered": [ordered[0], ordered[2], ordered[1], ordered[3]],
        "named": [named[1]],
    }


async def test_a_run_is_leased_only_up_to_a_delivery_another_gateway_holds(
    opener: Opener, pg_url: str
) -> None:
    """A follower locked by another gateway's claim ends the run there: what follows it is
    not leased to this gateway (else it would wait lease_s for nothing), so the other gateway
    may claim it in its turn."""
    writer = await opener(dispatching=False)
    run = []
    for n in range(4):
        found = await writer.accept(b'{"n":%d}' % n, SIG, [Route("t", None, "k")], 1000.0)
        assert found is not None
        run.append(found[0].id)
    rowids = [int(delivery_id.rpartition("-")[2]) for delivery_id in run]
    box = await opener()
    assert isinstance(box, PostgresOutbox)
    other = await asyncpg.connect(pg_url)
    try:
        async with other.transaction():
            await other.execute(
                "SELECT id FROM waba_gateway.deliveries WHERE id = $1 FOR UPDATE", rowids[2]
            )
            claimed = await box.due(2000.0, {"t": 1}, ordered={"t"}, runs={"t": 4})
        assert [d.id for d in claimed] == run[:2]
        owners = await other.fetch(
            "SELECT id, lease_owner FROM waba_gateway.deliveries WHERE id = ANY($1) ORDER BY id",
            rowids,
        )
        assert [row[1] for row in owners] == [box.owner, box.owner, None, None]
    finally:
        await other.close()


async def test_a_lease_renewal_never_waits_for_a_row_a_record_holds_so_never_deadlocks(
    opener: Opener, pg_url: str
) -> None:
    """A record in progress (another transaction) holds the second of a gateway's two leased
    deliveries and then wants the first: the heartbeat's renewal neither waits for the held
    row nor keeps the first from the record; it renews the first, and the next beat the
    second. Waiting, the two took each other's rows in opposite orders: PostgreSQL aborted
    one as a deadlock, and an aborted record sent its whole batch to the target again."""
    box = await opener(lease_s=30.0)
    assert isinstance(box, PostgresOutbox)
    first, second = [int(d.rpartition("-")[2]) for d in await _store(box, 2)]
    record = await asyncpg.connect(pg_url)
    try:
        before = await record.fetchval(
            "SELECT lease_until FROM waba_gateway.deliveries WHERE id = $1", first
        )
        async with record.transaction():
            await record.execute(
                "UPDATE waba_gateway.deliveries SET updated_at = updated_at WHERE id = $1", second
            )
            await asyncio.wait_for(box.renew(), 3.0)
            await asyncio.wait_for(
                record.execute(
                    "UPDATE waba_gateway.deliveries SET updated_at = updated_at WHERE id = $1",
                    first,
                ),
                3.0,
            )
        after = await record.fetchval(
            "SELECT lease_until FROM waba_gateway.deliveries WHERE id = $1", first
        )
        assert after > before
    finally:
        await record.close()
    await box.renew()


async def _conversation(writer: Outbox, key: str, count: int, start: int = 0) -> list[str]:
    ids = []
    for n in range(start, start + count):
        found = await writer.accept(
            b'{"%s":%d}' % (key.encode(), n), SIG, [Route("t", None, key)], 1000.0
        )
        assert found is not None
        ids.append(found[0].id)
    return ids


async def test_what_follows_a_run_is_leased_to_its_gateway_in_order_up_to_another_gateways_hold(
    opener: Opener, pg_url: str
) -> None:
    """``following`` on a shared database: the deliveries behind a run's last one, in their
    order, leased to the gateway that asked, and none past a delivery another gateway holds
    (locked by its claim), so that gateway may take the rest in its turn. Another gateway's
    claim then finds nothing of the conversation to start."""
    writer = await opener(dispatching=False)
    run = await _conversation(writer, "k", 6)
    box = await opener()
    assert isinstance(box, PostgresOutbox)
    claimed = await box.due(2000.0, {"t": 1}, ordered={"t"}, runs={"t": 2})
    assert [d.id for d in claimed] == run[:2]
    rowids = [int(delivery_id.rpartition("-")[2]) for delivery_id in run]
    other = await asyncpg.connect(pg_url)
    try:
        async with other.transaction():
            await other.execute(
                "SELECT id FROM waba_gateway.deliveries WHERE id = $1 FOR UPDATE", rowids[4]
            )
            found = await box.following(2000.0, "t", {"k": run[1]}, 8)
        assert {key: [d.id for d in ds] for key, ds in found.items()} == {"k": run[2:4]}
        assert all(d.order_key == "k" and d.body for d in found["k"])
        owners = await other.fetch(
            "SELECT id, lease_owner FROM waba_gateway.deliveries WHERE id = ANY($1) ORDER BY id",
            rowids,
        )
        assert [row[1] for row in owners] == [box.owner] * 4 + [None, None]
    finally:
        await other.close()
    second = await opener()
    assert await second.due(2000.0, {"t": 10}, ordered={"t"}, runs={"t": 8}) == []


async def test_nothing_follows_a_recorded_delivery_and_what_follows_stops_before_one_not_due(
    opener: Opener, pg_url: str
) -> None:
    """A run's last delivery already recorded names no place to follow, nor does another
    store's id; and what follows stops at the first delivery whose retry is not due yet."""
    writer = await opener(dispatching=False)
    done = await _conversation(writer, "k2", 2)
    later = await _conversation(writer, "k3", 5)
    box = await opener()
    await box.due(2000.0, {"t": 2}, ordered={"t"})
    await box.record_many([(done[0], Delivered(), AttemptResult(status=200))], 2000.0)
    assert await box.following(2000.0, "t", {"k2": done[0], "k3": "elsewhere-1"}, 8) == {}
    other = await asyncpg.connect(pg_url)
    try:
        await other.execute(
            "UPDATE waba_gateway.deliveries SET next_attempt_at = 5000 WHERE id = $1",
            int(later[3].rpartition("-")[2]),
        )
    finally:
        await other.close()
    found = await box.following(2000.0, "t", {"k3": later[0]}, 8)
    assert [d.id for d in found["k3"]] == later[1:3]


async def test_purge_dead_goes_on_past_one_bounded_step(opener: Opener, pg_url: str) -> None:
    """More expired dead letters than one statement takes (``PRUNE_BATCH``), with their
    attempts: the purge takes them in bounded steps until none is left and counts them all;
    a young dead letter stays. (One statement for every expired dead letter outran the pool's
    command timeout on a large backlog, was rolled back, and so never ended.)"""
    outbox = await opener()
    count = sql.PRUNE_BATCH * 2 + 3
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(
            "INSERT INTO waba_gateway.notifications (received_at, signature, body)"
            " SELECT 1.0, 'sha256=0', '\\x7b7d'::bytea FROM generate_series(1, $1::integer)",
            count + 1,
        )
        await conn.execute(
            "INSERT INTO waba_gateway.deliveries (notification_id, target, state, attempts,"
            " created_at, next_attempt_at, updated_at, last_error)"
            " SELECT id, 't', 'dead', 1, 1.0, 1.0, CASE WHEN id = $1 THEN 9.0 ELSE 1.0 END,"
            " 'HTTP 400' FROM waba_gateway.notifications",
            count + 1,
        )
        await conn.execute(
            "INSERT INTO waba_gateway.attempts (delivery_id, number, at, state, status, response)"
            " SELECT id, 1, 1.0, 'dead', 400, '' FROM waba_gateway.deliveries"
        )
        assert await outbox.purge_dead(5.0) == count
        left = await conn.fetchval("SELECT count(*) FROM waba_gateway.deliveries")
        attempts = await conn.fetchval("SELECT count(*) FROM waba_gateway.attempts")
    finally:
        await conn.close()
    assert (left, attempts) == (1, 1)


async def test_replay_many_goes_in_bounded_steps_keeping_each_conversations_order(
    opener: Opener, pg_url: str
) -> None:
    """More keyed dead letters than one step takes (``REPLAY_BATCH``): the replay commits them
    in bounded steps, each its own transaction, and counts them all; each conversation's
    replayed deliveries go to its back (behind a pending one) in the order they had, across the
    steps' cuts, one an earlier replay put at the back included (its id comes first, its place
    last). One transaction for every matching row outran the pool's command timeout on a large
    backlog, was rolled back, and so could never replay it."""
    outbox = await opener()
    count = sql.REPLAY_BATCH * 2 + 3
    conn = await asyncpg.connect(pg_url)
    try:
        notification = await conn.fetchval(
            "INSERT INTO waba_gateway.notifications (received_at, signature, body)"
            " VALUES (1.0, 'sha256=0', '\\x7b7d'::bytea) RETURNING id"
        )
        keyed = (
            "INSERT INTO waba_gateway.deliveries (notification_id, target, state, attempts,"
            " created_at, next_attempt_at, updated_at, order_key, last_error)"
            " SELECT $1, 't', 'dead', 1, 1.0, 1.0, 1.0, 'k' || (g % 100), 'HTTP 400'"
            " FROM generate_series(1, $2::integer) AS g"
        )
        await conn.execute(keyed, notification, count)
        first = await conn.fetchval(
            "UPDATE waba_gateway.deliveries SET position ="
            " nextval(pg_get_serial_sequence('waba_gateway.deliveries', 'id'))"
            " WHERE id = (SELECT min(id) FROM waba_gateway.deliveries WHERE order_key = 'k1')"
            " RETURNING id"
        )
        pending = await conn.fetchval(
            "INSERT INTO waba_gateway.deliveries (notification_id, target, state, attempts,"
            " created_at, next_attempt_at, updated_at, order_key)"
            " VALUES ($1, 't', 'pending', 0, 1.0, 1.0, 1.0, 'k1') RETURNING id",
            notification,
        )
        conversation = (
            "SELECT id FROM waba_gateway.deliveries WHERE order_key = 'k1'"
            " ORDER BY COALESCE(position, id)"
        )
        before = [row[0] for row in await conn.fetch(conversation)]
        assert before[-2:] == [first, pending]
        assert await outbox.replay_many(state="dead", target=None, since=None, now=2000.0) == count
        steps = await conn.fetch(
            "SELECT count(*) FROM waba_gateway.deliveries WHERE state = 'pending' AND id <> $1"
            " GROUP BY xmin::text",
            pending,
        )
        after = [row[0] for row in await conn.fetch(conversation)]
    finally:
        await conn.close()
    assert sorted(row[0] for row in steps) == [3, sql.REPLAY_BATCH, sql.REPLAY_BATCH]
    assert after == [pending, *before[:-1]]


async def test_a_gateway_lets_go_of_the_leases_on_targets_it_no_longer_sends_to(
    opener: Opener, pg_server: PgServer, pg_url: str
) -> None:
    """A gateway told to keep its leases on target ``t`` alone (its dispatcher's targets after
    a reload removed ``u``) lets go of those on ``u``'s deliveries at once, and says so to the
    other gateways: one of them, woken, claims them, long before the lease would have run out.
    Those on ``t`` it keeps, past their lease, as every living gateway's."""
    woken = asyncio.Event()
    other = await opener(on_wake=woken.set, lease_s=1.0)
    await _until_listening(pg_server, pg_url)
    box = await opener(lease_s=1.0)
    assert isinstance(box, PostgresOutbox)
    kept = await _store(box, 2, target="t")
    routes = [Route("u", None)]
    let_go = [
        found[0].id
        for n in range(2)
        if (found := await box.accept(b'{"u":%d}' % n, SIG, routes, 1000.0)) is not None
    ]
    assert await other.due(2000.0, {"t": 10, "u": 10}) == []
    box.keep_leases({"t"})
    await asyncio.wait_for(woken.wait(), 5.0)
    claimed = await other.due(2000.0, {"t": 10, "u": 10})
    assert sorted(d.id for d in claimed) == sorted(let_go)
    await asyncio.sleep(1.5)  # past the lease: renewed by the heartbeat, still its own
    assert await other.due(2000.0, {"t": 10}) == []
    assert len(kept) == 2


async def test_a_gateway_closed_cleanly_lets_go_of_its_leases_so_another_claims_them_at_once(
    opener: Opener, pg_server: PgServer, pg_url: str
) -> None:
    """A dispatching gateway stopped cleanly (SIGTERM: its dispatcher stopped, then its outbox
    closed) with deliveries it leased and did not send, leased when it accepted them or when it
    claimed them: it lets go of those leases as it closes and says so, and another gateway,
    woken, claims them all at once, not a minute later when the leases (``lease_s`` = 60, the
    default) would have run out."""
    woken = asyncio.Event()
    other = await opener(on_wake=woken.set, lease_s=60.0)
    await _until_listening(pg_server, pg_url)
    box = await opener(lease_s=60.0)
    accepted = await _store(box, 3)
    writer = await opener(dispatching=False)
    found = await writer.accept(b'{"u":1}', SIG, [Route("u", None), Route("u", b"{}")], 1000.0)
    assert found is not None
    stored = [d.id for d in found]
    await asyncio.wait_for(woken.wait(), 5.0)  # the writer's announcement, heard
    woken.clear()
    claimed = await box.due(2000.0, {"u": 10})
    assert sorted(d.id for d in claimed) == sorted(stored)
    assert await other.due(2000.0, {"t": 10, "u": 10}) == []
    started = time.monotonic()
    await box.close()
    await asyncio.wait_for(woken.wait(), 5.0)
    taken = await other.due(2000.0, {"t": 10, "u": 10})
    assert sorted(d.id for d in taken) == sorted(accepted + stored)
    assert time.monotonic() - started < 5.0


async def test_an_outcome_recorded_as_the_gateway_closes_counts_and_only_the_rest_is_let_go(
    opener: Opener, pg_url: str
) -> None:
    """The last outcome of a gateway that stops is still on its way when the outbox closes
    (its batch cancelled by the dispatcher's stop, the record waiting for a row another
    transaction holds): the close commits it under the lease it was sent under, and only then
    lets go of the leases; the delivery is delivered once, never claimed again, and the one
    that was not sent goes to the other gateway at once. Let go before the record, the outcome
    would not count (it counts only under the recording gateway's lease) and the delivery would
    be sent again."""
    box = await opener(lease_s=60.0)
    sent, unsent = await _store(box, 2)
    holder = await asyncpg.connect(pg_url)
    try:
        async with holder.transaction():
            await holder.execute("SELECT id FROM waba_gateway.deliveries FOR UPDATE")
            record = asyncio.create_task(
                box.record_many([(sent, Delivered(), AttemptResult(status=200))], 1001.0)
            )
            await asyncio.sleep(0.1)  # submitted, and waiting for the rows
            record.cancel()  # the batch cancelled: its submitted outcome still goes
            closing = asyncio.create_task(box.close())
            await asyncio.sleep(0.3)
            assert not closing.done()  # the close waits for the outcome
        await asyncio.wait_for(closing, 5.0)
    finally:
        await holder.close()
    other = await opener(lease_s=60.0)
    assert [d.id for d in await other.due(2000.0, {"t": 10})] == [unsent]
    delivered = await other.get(sent)
    assert delivered is not None
    assert (delivered.state, delivered.attempts) == ("delivered", 1)


async def test_a_delivery_still_out_when_the_gateway_stops_keeps_its_lease_until_its_outcome(
    opener: Opener, sink: Sink
) -> None:
    """A gateway stops (as the runtime does: its dispatcher, then its outbox) while its target
    still holds one delivery and the others wait behind it: until that attempt's outcome is
    recorded no other gateway claims the delivery out on the wire (it would be sent twice at
    once); once the outbox has closed, the other gateway claims what was not sent at once,
    and the one that was is delivered, once."""
    box = await opener(lease_s=60.0)
    other = await opener(lease_s=60.0)
    sink.script(Hang(1.5))
    target = sink_target(sink, timeout_s=10.0, concurrency=1)
    stored = await _store(box, 3, target=target.name)
    dispatcher = Dispatcher(box, [target], DispatcherConfig(), retention_s=3600)
    dispatcher.start()
    (out,) = await sink.wait_for(1)
    stopping = asyncio.create_task(dispatcher.stop(grace_s=5.0))
    while not stopping.done():  # the attempt is still out: nothing of this gateway's is free
        assert await other.due(2000.0, {target.name: 10}) == []
        await asyncio.sleep(0.05)
    await stopping
    await box.close()
    assert len(sink.received) == 1
    sent = out.headers["X-Gateway-Delivery-Id"]
    taken = await other.due(2000.0, {target.name: 10})
    assert sorted(d.id for d in taken) == sorted(set(stored) - {sent})
    delivered = await other.get(sent)
    assert delivered is not None
    assert (delivered.state, delivered.attempts) == ("delivered", 1)
