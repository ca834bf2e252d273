"""The PostgreSQL outbox's statements that lock many deliveries lock them in one order (by id),
so an operator's replay during delivery never deadlocks with the outcomes being recorded
(gateway.outbox.postgres)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg
import pytest
from pglocks import waiting_on_locks

from gateway.config import OutboxConfig
from gateway.outbox import (
    AttemptResult,
    DeadLetter,
    Delivered,
    Outbox,
    Outcome,
    RetryAt,
    Route,
    State,
    open_outbox,
)
from gateway.outbox.postgres import sql

SIG = "sha256=" + "0" * 64


# Three deliveries, one held by another transaction while a replay of all of them and a batch of
# outcomes for the other two start: the replay takes what comes before the held one in its order
# and waits there; the outcomes take one of the others and wait for the second. Each case is one
# way the old statements took these locks in opposite orders: (the first delivery retried once
# before, the one held, the outcomes' order).
CASES = {
    # The batch names the last delivery before the first.
    "outcomes-named-backwards": (False, "middle", ("last", "first")),
    # The first delivery was retried once, so its row now stands after the others in the index
    # of pending deliveries by due time (and in the table): a replay scanning either reaches it
    # last.
    "replay-in-the-index-order": (True, "last", ("first", "middle")),
}


@pytest.mark.parametrize(("retried", "held", "named"), CASES.values(), ids=CASES.keys())
async def test_a_replay_of_many_during_recorded_outcomes_never_deadlocks(
    pg_url: str, retried: bool, held: str, named: tuple[str, str]
) -> None:
    """A replay of many deliveries and a batch of their outcomes at once both finish, in
    either order of rows: neither is aborted as a deadlock."""
    outbox: Outbox = await open_outbox(OutboxConfig(url=pg_url))
    blocker, watcher = await asyncpg.connect(pg_url), await asyncpg.connect(pg_url)
    try:
        ids = {}
        for n, name in enumerate(("first", "middle", "last")):
            found = await outbox.accept(b'{"n":%d}' % n, SIG, [Route("t", None)], 1000.0)
            assert found is not None
            ids[name] = found[0].id
        retry = RetryAt(1500.0, "HTTP 503")
        if retried:
            await outbox.record_many([(ids["first"], retry, AttemptResult(status=503))], 1050.0)
        await blocker.execute("BEGIN")
        await blocker.execute(
            "SELECT 1 FROM waba_gateway.deliveries WHERE id = $1 FOR UPDATE",
            int(ids[held].rpartition("-")[2]),  # the row id the delivery id ends with
        )
        replay = asyncio.create_task(
            outbox.replay_many(state="pending", target=None, since=None, now=1100.0)
        )
        await waiting_on_locks(watcher, 1)
        outcomes = [(ids[name], retry, AttemptResult(status=503)) for name in named]
        record = asyncio.create_task(outbox.record_many(outcomes, 1200.0))
        await waiting_on_locks(watcher, 2)
        await blocker.execute("ROLLBACK")
        assert await asyncio.wait_for(replay, 10.0) == 3
        await asyncio.wait_for(record, 10.0)
        assert len(await outbox.query(state="pending")) == 3
    finally:
        await blocker.close()
        await watcher.close()
        await outbox.close()


async def _three_in_scan_order(outbox: Outbox, outcome: Outcome) -> dict[str, str]:
    """Three deliveries of target ``t`` with ``outcome`` recorded, the first one last: its row's
    new version stands after the others' in the table and in the index by change time, so a
    statement scanning either reaches it last, while an order by id takes it first."""
    ids = {}
    for n, name in enumerate(("first", "middle", "last")):
        found = await outbox.accept(b'{"k":%d}' % n, SIG, [Route("t", None)], 1000.0)
        assert found is not None
        ids[name] = found[0].id
    for at, name in enumerate(("middle", "last", "first")):
        await outbox.record_many([(ids[name], outcome, AttemptResult(status=200))], 1100.0 + at)
    return ids


def _rowid(delivery_id: str) -> int:
    return int(delivery_id.rpartition("-")[2])  # the row id the delivery id ends with


# Each removal of many deliveries with the replay of those same deliveries (by state), while
# another transaction holds the last of them: the removal starts first.
REMOVALS = {
    "purge-of-dead-letters": (
        DeadLetter("HTTP 400"),
        "dead",
        lambda outbox: outbox.purge_dead(2000.0),
    ),
    "prune-of-delivered": (
        Delivered(),
        "delivered",
        lambda outbox: outbox.prune(2000.0, 1.0, ["t"]),
    ),
}


@pytest.mark.parametrize(("outcome", "state", "remove"), REMOVALS.values(), ids=REMOVALS.keys())
async def test_a_removal_of_many_during_a_replay_of_many_never_deadlocks(
    pg_url: str,
    outcome: Outcome,
    state: State,
    remove: Callable[[Outbox], Coroutine[Any, Any, int]],
) -> None:
    """A purge of dead letters or a prune of delivered rows and a replay of those same
    deliveries at once both finish: neither is aborted as a deadlock, and each delivery is
    either removed or replayed."""
    outbox: Outbox = await open_outbox(OutboxConfig(url=pg_url))
    blocker, watcher = await asyncpg.connect(pg_url), await asyncpg.connect(pg_url)
    try:
        ids = await _three_in_scan_order(outbox, outcome)
        await blocker.execute("BEGIN")
        await blocker.execute(
            "SELECT 1 FROM waba_gateway.deliveries WHERE id = $1 FOR UPDATE", _rowid(ids["last"])
        )
        removal = asyncio.create_task(remove(outbox))
        await waiting_on_locks(watcher, 1)
        replay = asyncio.create_task(
            outbox.replay_many(state=state, target=None, since=None, now=3000.0)
        )
        await waiting_on_locks(watcher, 2)
        await blocker.execute("ROLLBACK")
        removed = await asyncio.wait_for(removal, 10.0)
        replayed = await asyncio.wait_for(replay, 10.0)
        assert removed + replayed == 3
        assert len(await outbox.query(state="pending")) == replayed
    finally:
        await blocker.close()
        await watcher.close()
        await outbox.close()


async def test_a_prune_never_removes_a_delivery_replayed_while_it_waited(pg_url: str) -> None:
    """A delivered row replayed by a transaction the prune waits for is pending when the prune
    reaches it: it stays, and is delivered again as the replay promised."""
    outbox: Outbox = await open_outbox(OutboxConfig(url=pg_url))
    replayer, watcher = await asyncpg.connect(pg_url), await asyncpg.connect(pg_url)
    try:
        ids = await _three_in_scan_order(outbox, Delivered())
        await replayer.execute("BEGIN")
        await replayer.fetch(sql.REPLAY, _rowid(ids["middle"]), 1500.0)
        prune = asyncio.create_task(outbox.prune(2000.0, 1.0, ["t"]))
        await waiting_on_locks(watcher, 1)
        await replayer.execute("COMMIT")
        assert await asyncio.wait_for(prune, 10.0) == 2
        assert [d.id for d in await outbox.query(state="pending")] == [ids["middle"]]
    finally:
        await replayer.close()
        await watcher.close()
        await outbox.close()
