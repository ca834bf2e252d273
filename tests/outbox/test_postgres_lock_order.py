"""The PostgreSQL outbox's statements that lock many deliveries lock them in one order (by id),
so an operator's replay during delivery never deadlocks with the outcomes being recorded
(gateway.outbox.postgres)."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from gateway.config import OutboxConfig
from gateway.outbox import AttemptResult, Outbox, RetryAt, Route, open_outbox

SIG = "sha256=" + "0" * 64


async def _waiting_on_locks(conn: asyncpg.Connection, count: int) -> None:
    """Return once ``count`` backends of this database wait for a lock (at most 10 s); ``conn``
    outside a transaction, which would see one snapshot of the activity."""
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND datname = current_database()"
        )
        if waiting >= count:
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"fewer than {count} statements came to wait for a row lock")


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
    outbox: Outbox = await open_outbox(OutboxConfig(url=pg_url), dispatching=False)
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
        await _waiting_on_locks(watcher, 1)
        outcomes = [(ids[name], retry, AttemptResult(status=503)) for name in named]
        record = asyncio.create_task(outbox.record_many(outcomes, 1200.0))
        await _waiting_on_locks(watcher, 2)
        await blocker.execute("ROLLBACK")
        assert await asyncio.wait_for(replay, 10.0) == 3
        await asyncio.wait_for(record, 10.0)
        assert len(await outbox.query(state="pending")) == 3
    finally:
        await blocker.close()
        await watcher.close()
        await outbox.close()
