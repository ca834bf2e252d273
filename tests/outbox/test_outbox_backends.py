"""The outbox's behaviour, the same on every backend: each test runs on SQLite and on a real
PostgreSQL server, through the one interface (open_outbox), so the backends cannot drift."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from pathlib import Path
from typing import Unpack

import pytest
from helpers import OpenOptions

from gateway.config import OutboxConfig
from gateway.delivery.reporting import IGNORE
from gateway.delivery.retention import Retention
from gateway.errors import OutboxError
from gateway.outbox import (
    AcceptsSoon,
    AttemptResult,
    DeadLetter,
    Delivered,
    Delivery,
    Outbox,
    RetryAt,
    Route,
    open_outbox,
)

DAY = 86400.0
SIG = "sha256=" + "0" * 64
OK = AttemptResult(status=200)

Opener = Callable[..., Awaitable[Outbox]]


@pytest.fixture(params=["sqlite", "postgres"])
async def opener(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens outboxes on one store (a SQLite file, or a new PostgreSQL database); all are
    closed at the end."""
    if request.param == "sqlite":
        base = OutboxConfig(path=tmp_path / "outbox.sqlite3")
    else:
        base = OutboxConfig(url=request.getfixturevalue("pg_url"))
    opened: list[Outbox] = []

    async def open_one(dedup_window_s: float = 7 * DAY, **options: Unpack[OpenOptions]) -> Outbox:
        config = OutboxConfig(
            path=base.path, url=base.url, dedup_window_s=dedup_window_s, lease_s=30.0
        )
        outbox = await open_outbox(config, **options)
        opened.append(outbox)
        return outbox

    yield open_one
    for outbox in opened:
        await outbox.close()


@pytest.fixture
async def outbox(opener: Opener) -> Outbox:
    return await opener()


async def one(outbox: Outbox, n: int, at: float = 1000.0) -> Delivery:
    """Accept notification ``n`` with one route to target ``t``; its delivery."""
    found = await outbox.accept(b'{"n":%d}' % n, SIG, [Route("t", None)], at)
    assert found is not None
    return found[0]


async def test_only_the_sqlite_outbox_offers_accept_as_a_future(
    outbox: Outbox, request: pytest.FixtureRequest
) -> None:
    """The listener takes the ack path without a task when ``isinstance(outbox,
    AcceptsSoon)``: the SQLite outbox offers it, the PostgreSQL one does not (its accepts are
    tasks of its group committer)."""
    backend = request.node.callspec.params["opener"]
    assert isinstance(outbox, AcceptsSoon) == (backend == "sqlite")


async def test_accept_returns_one_pending_delivery_per_route(outbox: Outbox) -> None:
    """A notification with two routes gives two pending deliveries, split bodies kept apart."""
    found = await outbox.accept(b'{"a":1}', SIG, [Route("t1", None), Route("t2", b"{}")], 1000.0)
    assert found is not None
    assert [(d.target, d.body, d.split, d.state) for d in found] == [
        ("t1", b'{"a":1}', False, "pending"),
        ("t2", b"{}", True, "pending"),
    ]
    listed = await outbox.query()
    assert sorted(d.id for d in listed) == sorted(d.id for d in found)
    assert {d.signature for d in listed} == {SIG}


async def test_identical_body_inside_window_is_a_duplicate_and_after_it_is_new(
    opener: Opener,
) -> None:
    """The same bytes inside dedup_window_s are acknowledged, not stored; after it, stored."""
    box = await opener(dedup_window_s=60.0)
    assert await box.accept(b"{}", SIG, [Route("t", None)], 1000.0)
    assert await box.accept(b"{}", SIG, [Route("t", None)], 1030.0) is None
    assert await box.accept(b"{}", SIG, [Route("t", None)], 1061.0)
    assert (await box.counts())["pending"] == 2


async def test_duplicate_sent_to_two_outboxes_on_one_store_is_stored_once(
    opener: Opener,
) -> None:
    """Two gateways sharing a store, the same body at once: exactly one stores it."""
    first, second = await opener(), await opener()
    results = await asyncio.gather(
        *(box.accept(b'{"same":1}', SIG, [Route("t", None)], 1000.0) for box in (first, second))
    )
    assert sorted(result is None for result in results) == [False, True]
    assert (await first.counts())["pending"] == 1


async def test_concurrent_accepts_all_stored_with_unique_ids(outbox: Outbox) -> None:
    """Many accepts at once (one group commit or several) each get their own delivery."""
    results = await asyncio.gather(
        *(outbox.accept(b'{"n":%d}' % i, SIG, [Route("t", None)], 1000.0) for i in range(50))
    )
    ids = [d.id for found in results if found for d in found]
    assert len(set(ids)) == 50


async def test_due_is_oldest_first_per_target_limit_leaving_out_excluded_and_future(
    outbox: Outbox,
) -> None:
    """due() gives what has come due, oldest first, within each target's limit."""
    made = [await one(outbox, i, at) for i, at in enumerate((1003.0, 1001.0, 1002.0, 5000.0))]
    due = await outbox.due(2000.0, {"t": 10}, exclude={made[2].id})
    assert [d.id for d in due] == [made[1].id, made[0].id]
    assert len(await outbox.due(2000.0, {"t": 1})) == 1
    assert await outbox.due(2000.0, {"other": 10}) == []


async def test_outcomes_move_a_delivery_through_its_states(outbox: Outbox) -> None:
    """Retry keeps it pending with a later time, delivered and dead letters leave due()."""
    a, b = await one(outbox, 0), await one(outbox, 1)
    failed = AttemptResult(status=503, response_excerpt="busy")
    await outbox.record_many([(a.id, RetryAt(1100.0, "HTTP 503"), failed)], 1001.0)
    assert [d.id for d in await outbox.due(1050.0, {"t": 10})] == [b.id]
    (retried,) = await outbox.due(1100.0, {"t": 10}, exclude={b.id})
    assert (retried.id, retried.attempts, retried.last_status) == (a.id, 1, 503)
    await outbox.record_many(
        [(a.id, Delivered(), OK), (b.id, DeadLetter("HTTP 400"), AttemptResult(status=400))],
        1200.0,
    )
    assert await outbox.counts() == {"pending": 0, "delivered": 1, "dead": 1}
    (dead,) = await outbox.query(state="dead")
    assert (dead.id, dead.last_error) == (b.id, "HTTP 400")
    assert await outbox.due(9999.0, {"t": 10}) == []


async def test_replay_makes_a_dead_letter_pending_and_due_now(outbox: Outbox) -> None:
    """A replayed dead letter is pending again with a fresh count; unknown ids are False."""
    (d,) = await outbox.accept(b"{}", SIG, [Route("t", None)], 1000.0) or []
    await outbox.record_many([(d.id, DeadLetter("gave up"), OK)], 1001.0)
    assert await outbox.replay(d.id, 2000.0)
    (again,) = await outbox.due(2000.0, {"t": 10})
    assert (again.id, again.attempts, again.created_at) == (d.id, 0, 2000.0)
    for unknown in ("nope", f"{d.id}0", "x-1", ""):
        assert not await outbox.replay(unknown, 2000.0)


async def test_an_outcome_is_not_recorded_over_a_replay_made_while_its_attempt_was_out(
    opener: Opener,
) -> None:
    """Handed out, then replayed by another opener of the store (the command line, another
    gateway) while its attempt was out: that attempt's outcome, recorded with the created_at
    it was handed out with, leaves the replay standing (pending, due, no attempt counted);
    one handed out after the replay records as usual."""
    box, other = await opener(), await opener()
    d, e = await one(box, 0), await one(box, 1)
    assert await other.replay(d.id, 2000.0)
    handed = {d.id: d.created_at, e.id: e.created_at}
    await box.record_many([(d.id, Delivered(), OK), (e.id, Delivered(), OK)], 2001.0, handed)
    found = await box.get(d.id)
    assert found is not None
    assert (found.state, found.attempts, found.created_at) == ("pending", 0, 2000.0)
    assert await box.attempts(d.id) == []
    assert [r.outcome for r in await box.attempts(e.id)] == ["delivered"]
    (again,) = await box.due(2002.0, {"t": 10})
    await box.record_many([(again.id, Delivered(), OK)], 2003.0, {again.id: again.created_at})
    assert await box.counts() == {"pending": 0, "delivered": 2, "dead": 0}


async def test_retention_prunes_the_delivered_rows_of_a_target_no_longer_configured(
    outbox: Outbox,
) -> None:
    """Delivered rows of ``t`` (configured) and of ``gone`` (removed by a reload), and a
    pending delivery of ``gone``: the outbox lists both targets as holding delivered rows, and
    retention, told of ``t`` alone, prunes both targets' delivered rows past ``retention_s``;
    the pending delivery stays, as a removed target's pending deliveries do."""
    kept = await one(outbox, 0)
    gone = []
    for n in (1, 2):
        found = await outbox.accept(b'{"n":%d}' % n, SIG, [Route("gone", None)], 1000.0)
        assert found is not None
        gone.append(found[0])
    await outbox.record_many([(kept.id, Delivered(), OK), (gone[0].id, Delivered(), OK)], 1000.0)
    assert await outbox.delivered_targets() == ["gone", "t"]
    await Retention(outbox, DAY, None, IGNORE).maybe_prune(1000.0 + 2 * DAY, ["t"])
    assert await outbox.get(kept.id) is None
    assert await outbox.get(gone[0].id) is None
    assert await outbox.get(gone[1].id) is not None
    assert await outbox.delivered_targets() == []


async def test_prune_removes_old_delivered_and_keeps_dead_pending_and_dedup(
    opener: Opener,
) -> None:
    """Old delivered rows go; dead letters and pending stay; a duplicate inside the
    deduplication window is still recognised after the prune."""
    box = await opener(dedup_window_s=10 * DAY)
    made = [await one(box, i) for i in range(3)]
    await box.record_many(
        [(made[0].id, Delivered(), OK), (made[1].id, DeadLetter("x"), OK)], 1000.0
    )
    assert await box.prune(1000.0 + 2 * DAY, DAY, ["t"]) == 1
    assert await box.counts() == {"pending": 1, "delivered": 0, "dead": 1}
    assert await box.accept(b'{"n":0}', SIG, [Route("t", None)], 1000.0 + 2 * DAY) is None


async def test_attempt_history_get_and_backlog(outbox: Outbox) -> None:
    """Every recorded attempt is kept, numbered again from 1 after a replay; get() reads one
    delivery; backlog() counts pending and dead per target."""
    a, b = await one(outbox, 0), await one(outbox, 1)
    busy = AttemptResult(status=503, response_excerpt="busy")
    await outbox.record_many([(a.id, RetryAt(1100.0, "HTTP 503"), busy)], 1001.0)
    # Each attempt is made on a claim, as the dispatcher makes them: an outcome counts only
    # from the gateway that holds the delivery (its lease, on a shared database).
    assert a.id in {d.id for d in await outbox.due(1100.0, {"t": 10})}
    await outbox.record_many([(a.id, DeadLetter("HTTP 400"), AttemptResult(status=400))], 1101.0)
    assert [(r.number, r.outcome, r.status, r.response) for r in await outbox.attempts(a.id)] == [
        (1, "retry", 503, "busy"),
        (2, "dead", 400, ""),
    ]
    (backlog,) = await outbox.backlog()
    assert (backlog.target, backlog.pending, backlog.dead) == ("t", 1, 1)
    assert backlog.oldest_pending_at == 1000.0
    assert await outbox.replay(a.id, 1200.0)
    assert a.id in {d.id for d in await outbox.due(1200.0, {"t": 10})}
    await outbox.record_many([(a.id, Delivered(), OK)], 1201.0)
    assert [r.number for r in await outbox.attempts(a.id)] == [1, 2, 1]
    found = await outbox.get(b.id)
    assert found is not None
    assert (found.id, found.state) == (b.id, "pending")
    assert await outbox.get("nope") is None
    assert await outbox.attempts("nope") == []


async def test_replay_many_and_purge_dead(outbox: Outbox) -> None:
    """Dead letters of a target, changed since a time, replay at once; old ones purge, with
    their attempt history, on both backends alike."""
    made = [await one(outbox, i) for i in range(3)]
    for n, delivery in enumerate(made):
        await outbox.record_many([(delivery.id, DeadLetter("x"), OK)], 1000.0 + n)
    assert await outbox.replay_many(state="dead", target="t", since=1001.0, now=2000.0) == 2
    assert await outbox.counts() == {"pending": 2, "delivered": 0, "dead": 1}
    assert await outbox.purge_dead(1000.5) == 1
    assert await outbox.counts() == {"pending": 2, "delivered": 0, "dead": 0}
    assert await outbox.get(made[0].id) is None
    assert await outbox.attempts(made[0].id) == []


async def test_query_pages_in_a_stable_order(outbox: Outbox) -> None:
    """offset pages through deliveries changed at the same time without skipping any."""
    made = {(await one(outbox, i)).id for i in range(5)}
    pages = [await outbox.query(limit=2, offset=offset) for offset in (0, 2, 4)]
    seen = [d.id for page in pages for d in page]
    assert sorted(seen) == sorted(made)
    assert len(seen) == 5


async def test_query_filters_by_state_and_target_newest_first(outbox: Outbox) -> None:
    """query() filters and orders by the last change, newest first, within the limit."""
    for i in range(3):
        await outbox.accept(b'{"n":%d}' % i, SIG, [Route("a", None), Route("b", None)], 1000.0 + i)
    assert [d.target for d in await outbox.query(target="b")] == ["b"] * 3
    assert len(await outbox.query(state="pending", limit=2)) == 2
    assert await outbox.query(state="dead") == []


async def test_two_outboxes_on_one_store_see_the_same_ids(opener: Opener) -> None:
    """Ids are the store's: a second outbox on the same store lists and replays them."""
    first, second = await opener(), await opener()
    (d,) = await first.accept(b"{}", SIG, [Route("t", None)], 1000.0) or []
    assert [x.id for x in await second.query()] == [d.id]
    assert await second.replay(d.id, 1001.0)


async def test_ping_answers_and_a_closed_outbox_refuses(opener: Opener) -> None:
    """ping() returns on a working outbox; after close(), writes raise OutboxError."""
    box = await opener()
    await box.ping()
    await box.close()
    with pytest.raises(OutboxError):
        await box.accept(b"{}", SIG, [Route("t", None)], 1000.0)


async def test_reading_an_outbox_that_does_not_exist_is_refused(opener: Opener) -> None:
    """create=False (the command line's reads) refuses a store with no outbox yet."""
    with pytest.raises(OutboxError, match="no outbox"):
        await opener(create=False)


async def keyed(outbox: Outbox, n: int, key: str | None, at: float = 1000.0) -> Delivery:
    """Accept notification ``n`` with one route to target ``t`` in conversation ``key``."""
    found = await outbox.accept(b'{"k":%d}' % n, SIG, [Route("t", None, key)], at)
    assert found is not None
    return found[0]


async def test_ordered_claims_give_only_the_first_pending_delivery_of_each_conversation(
    outbox: Outbox,
) -> None:
    """For an ordered target, a conversation's later deliveries wait behind its first pending
    one; unkeyed deliveries and unordered targets are not held back."""
    a1, b1, _, free, _, _ = [
        await keyed(outbox, n, key) for n, key in enumerate(["a", "b", "a", None, "a", "b"])
    ]
    due = await outbox.due(2000.0, {"t": 10}, ordered={"t"})
    assert sorted(d.id for d in due) == sorted([a1.id, b1.id, free.id])
    unordered = await outbox.due(2000.0, {"t": 10})
    assert len(unordered) == 6


# Runs and the conversations beyond a claim's limit are the PostgreSQL outbox's: the SQLite one
# holds every conversation in memory and hands out first deliveries only (see below).
POSTGRES_ONLY = pytest.mark.parametrize("opener", ["postgres"], indirect=True)
SQLITE_ONLY = pytest.mark.parametrize("opener", ["sqlite"], indirect=True)


@POSTGRES_ONLY
async def test_an_ordered_claim_hands_out_runs_of_each_conversation_in_order(
    outbox: Outbox,
) -> None:
    """Asked for runs, each first delivery comes with the deliveries that follow it in its
    conversation, in order, right after it: at most runs - 1, the first ones alone counted
    toward the limit; a conversation whose first delivery is excluded (in flight) gives none."""
    a1, b1, a2, a3, b2, a4 = [
        await keyed(outbox, n, key) for n, key in enumerate(["a", "b", "a", "a", "b", "a"])
    ]
    due = await outbox.due(2000.0, {"t": 1}, ordered={"t"}, runs={"t": 3})
    assert [d.id for d in due] == [a1.id, a2.id, a3.id]
    due = await outbox.due(2000.0, {"t": 10}, ordered={"t"}, runs={"t": 3}, exclude={a1.id})
    assert [d.id for d in due] == [b1.id, b2.id]
    due = await outbox.due(2000.0, {"t": 10}, ordered={"t"}, runs={"t": 8})
    assert [d.id for d in due] == [a1.id, a2.id, a3.id, a4.id, b1.id, b2.id]


@POSTGRES_ONLY
async def test_a_look_at_every_conversation_names_those_beyond_its_limit(
    outbox: Outbox,
) -> None:
    """Asked about every conversation with room for two, an ordered claim hands out two first
    deliveries and names the other conversations with one due, in their order, for later
    claims to ask about by key; asked
    about named conversations, it names none."""
    firsts = [await keyed(outbox, n, key) for n, key in enumerate("abcde")]
    await keyed(outbox, 5, "a")
    more: dict[str, Collection[str]] = {}
    due = await outbox.due(2000.0, {"t": 2}, ordered={"t"}, more=more)
    assert [d.id for d in due] == [firsts[0].id, firsts[1].id]
    expected = ["c", "d", "e"]
    assert list(more.get("t", [])) == expected
    named: dict[str, Collection[str]] = {}
    due = await outbox.due(
        2000.0, {"t": 1}, ordered={"t"}, conversations={"t": {"c", "d"}}, more=named
    )
    assert [d.id for d in due] == [firsts[2].id]
    assert named == {}


@SQLITE_ONLY
async def test_a_sqlite_ordered_claim_hands_out_first_deliveries_only_in_order_and_no_more(
    outbox: Outbox,
) -> None:
    """The SQLite outbox, asked for runs and for the conversations beyond its limit, hands
    out each conversation's first delivery alone, in the order they were stored, the first
    ones alone counted toward the limit; it names no conversation in ``more`` and hands out
    nothing as following a delivery."""
    a1, b1, a2, _, b2, _ = [
        await keyed(outbox, n, key) for n, key in enumerate(["a", "b", "a", "a", "b", "a"])
    ]
    more: dict[str, Collection[str]] = {}
    due = await outbox.due(2000.0, {"t": 1}, ordered={"t"}, runs={"t": 3}, more=more)
    assert [d.id for d in due] == [a1.id]
    assert more == {}
    due = await outbox.due(2000.0, {"t": 10}, ordered={"t"}, runs={"t": 8}, exclude={a1.id})
    assert [d.id for d in due] == [b1.id]
    due = await outbox.due(2000.0, {"t": 10}, ordered={"t"}, runs={"t": 8}, more=more)
    assert [d.id for d in due] == [a1.id, b1.id]
    assert more == {}
    assert await outbox.following(2000.0, "t", {"a": a1.id, "b": b1.id}, 8) == {}
    await outbox.record_many([(a1.id, Delivered(), OK), (b1.id, Delivered(), OK)], 2001.0)
    due = await outbox.due(2002.0, {"t": 10}, ordered={"t"}, runs={"t": 8})
    assert [d.id for d in due] == [a2.id, b2.id]


async def test_a_retrying_first_delivery_holds_its_conversation_and_no_other(
    outbox: Outbox,
) -> None:
    """A first delivery waiting for its retry keeps its conversation's next one back, and
    never another conversation's; once delivered, the next one comes due."""
    a1, a2, b1 = [await keyed(outbox, n, key) for n, key in enumerate(["a", "a", "b"])]
    failed = AttemptResult(status=503)
    await outbox.record_many([(a1.id, RetryAt(3000.0, "HTTP 503"), failed)], 1001.0)
    assert [d.id for d in await outbox.due(2000.0, {"t": 10}, ordered={"t"})] == [b1.id]
    await outbox.record_many([(b1.id, Delivered(), OK)], 2001.0)
    assert await outbox.due(2000.0, {"t": 10}, ordered={"t"}) == []
    assert [d.id for d in await outbox.due(3000.0, {"t": 10}, ordered={"t"})] == [a1.id]
    await outbox.record_many([(a1.id, Delivered(), OK)], 3001.0)
    assert [d.id for d in await outbox.due(3001.0, {"t": 10}, ordered={"t"})] == [a2.id]


async def test_a_dead_letter_releases_its_conversation(outbox: Outbox) -> None:
    """A dead-lettered first delivery no longer holds the next one of its conversation."""
    a1, a2 = [await keyed(outbox, n, "a") for n in range(2)]
    await outbox.record_many([(a1.id, DeadLetter("HTTP 400"), AttemptResult(status=400))], 1001.0)
    assert [d.id for d in await outbox.due(2000.0, {"t": 10}, ordered={"t"})] == [a2.id]


@pytest.mark.parametrize("how", ["one", "many"])
async def test_a_replayed_delivery_goes_to_the_back_of_its_conversation(
    outbox: Outbox, how: str
) -> None:
    """Replayed (one by id, or all dead letters at once), a dead letter waits behind the
    deliveries of its conversation already pending, and comes before those accepted later."""
    a1, a2, a3 = [await keyed(outbox, n, "a") for n in range(3)]
    await outbox.record_many([(a1.id, DeadLetter("HTTP 400"), AttemptResult(status=400))], 1001.0)
    if how == "one":
        assert await outbox.replay(a1.id, 1500.0)
    else:
        assert await outbox.replay_many(state="dead", target=None, since=None, now=1500.0) == 1
    later = await keyed(outbox, 9, "a", at=1600.0)
    order = []
    for _ in range(4):
        (head,) = await outbox.due(2000.0, {"t": 10}, ordered={"t"})
        order.append(head.id)
        await outbox.record_many([(head.id, Delivered(), OK)], 2001.0)
    assert order == [a2.id, a3.id, a1.id, later.id]


async def test_rate_limit_buckets_belong_to_the_dispatcher_or_to_the_shared_database(
    outbox: Outbox,
) -> None:
    """A SQLite outbox (one dispatcher) leaves the bucket to the dispatcher; a shared one
    grants at most the burst, then what the rate has refilled, and takes back what it gave."""
    first = await outbox.take_tokens("t", 1.0, 5, 3)
    if first is None:
        return
    assert first == 3
    assert await outbox.take_tokens("t", 1.0, 5, 10) == 2
    assert await outbox.take_tokens("t", 1.0, 5, 10) == 0
    await outbox.give_back_tokens("t", 1.0, 5, 2)
    assert await outbox.take_tokens("t", 1.0, 5, 10) == 2
    assert await outbox.take_tokens("other", 1.0, 5, 10) == 5


async def test_held_back_counts_conversations_with_a_delivery_waiting_and_size_grows(
    outbox: Outbox,
) -> None:
    """held_back() counts, per ordered target, the conversations with a delivery waiting
    behind another (never the keys); size() is bytes on disk or rows, and grows."""
    for n, key in enumerate(["a", "a", "a", "b", "c", "c"]):
        await keyed(outbox, n, key)
    assert await outbox.held_back(["t", "other"]) == {"t": 2}
    assert await outbox.held_back([]) == {}

    async def grown() -> bool:
        size = await outbox.size()
        return (size.bytes or 0) > 0 or (size.rows or 0) > 0

    deadline = asyncio.get_running_loop().time() + 10
    while not await grown():  # PostgreSQL's statistics catch up within a second or so
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.2)


@pytest.mark.parametrize(
    ("age_days", "kept"),
    [(29.9, True), (30.1, False)],
)
async def test_purge_dead_takes_dead_letters_older_than_the_retention_only(
    outbox: Outbox, age_days: float, kept: bool
) -> None:
    """Dead letters last changed before the cut-off go; younger ones, and pending and
    delivered deliveries, stay."""
    dead, pending = await one(outbox, 0), await one(outbox, 1)
    await outbox.record_many([(dead.id, DeadLetter("HTTP 400"), AttemptResult(status=400))], 0.0)
    now = age_days * DAY
    removed = await outbox.purge_dead(now - 30 * DAY)
    assert removed == (0 if kept else 1)
    assert (await outbox.get(dead.id) is not None) is kept
    assert await outbox.get(pending.id) is not None


async def test_accept_says_which_fresh_deliveries_an_earlier_one_holds_back(
    outbox: Outbox,
) -> None:
    """Once a claim has looked at the ordered target (the SQLite outbox knows no conversation
    before one has), a fresh keyed delivery is behind exactly when an earlier one of its
    conversation is pending (also one of the same notification); a dead letter ahead no
    longer holds it back once a claim has seen it; an unkeyed one is never behind."""
    assert await outbox.due(1000.0, {"t": 10}, ordered={"t"}) == []
    a1, b1, a2 = [await keyed(outbox, n, key) for n, key in enumerate(["a", "b", "a"])]
    assert [d.behind for d in (a1, b1, a2)] == [False, False, True]
    twice = await outbox.accept(
        b'{"k":"twice"}', SIG, [Route("t", b"1", "c"), Route("t", b"2", "c")], 1000.0
    )
    assert [d.behind for d in twice or []] == [False, True]
    refused = AttemptResult(status=400)
    for d in (a1, a2):
        await outbox.record_many([(d.id, DeadLetter("HTTP 400"), refused)], 1001.0)
    assert len(await outbox.due(1002.0, {"t": 10}, ordered={"t"})) == 2  # b1 and c's first
    assert not (await keyed(outbox, 9, "a")).behind
    assert (await keyed(outbox, 10, "c")).behind
    assert not (await keyed(outbox, 11, None)).behind


@SQLITE_ONLY
async def test_before_any_ordered_claim_sqlite_says_every_fresh_keyed_delivery_is_behind(
    outbox: Outbox,
) -> None:
    """Until a claim of this process has lined up an ordered target, the SQLite outbox does
    not know which conversations have a delivery pending: every fresh keyed delivery may be
    held back (only a claim starts it), an unkeyed one never; a claim for no ordered target
    changes nothing."""
    a1, b1, a2 = [await keyed(outbox, n, key) for n, key in enumerate(["a", "b", "a"])]
    assert [d.behind for d in (a1, b1, a2)] == [True, True, True]
    assert not (await keyed(outbox, 3, None)).behind
    assert len(await outbox.due(2000.0, {"t": 10})) == 4
    assert (await keyed(outbox, 4, "d")).behind
    assert len(await outbox.due(2000.0, {"t": 10}, ordered={"t"})) == 4  # a1, b1, None, d
    assert not (await keyed(outbox, 5, "e")).behind
    assert (await keyed(outbox, 6, "a")).behind


@SQLITE_ONLY
async def test_a_delivery_another_outbox_stored_makes_sqlite_say_behind_until_the_next_claim(
    opener: Opener,
) -> None:
    """Once another outbox on the file has stored a delivery since this one's last claim, the
    SQLite outbox cannot tell whether a fresh delivery is first of its conversation: it says
    behind, even for a conversation nobody has used; its next claim reads what was stored
    and makes the answer exact again."""
    first, second = await opener(), await opener()
    assert await first.due(1000.0, {"t": 10}, ordered={"t"}) == []
    assert not (await keyed(first, 0, "a")).behind
    await keyed(second, 1, "z")
    assert (await keyed(first, 2, "b")).behind
    assert len(await first.due(1000.0, {"t": 10}, ordered={"t"})) == 3
    assert not (await keyed(first, 3, "c")).behind
    assert (await keyed(first, 4, "z")).behind


async def test_trace_context_is_stored_with_the_notification_and_read_back_by_another_outbox(
    opener: Opener,
) -> None:
    """The trace context given to accept() comes back on every delivery of the notification,
    fresh and claimed (by another outbox on the store too, as after a restart); an untraced
    notification's deliveries carry none."""
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\nvendor=opaque"
    first = await opener(dispatching=False)  # leases nothing: the second claims at once
    routes = [Route("t", None), Route("u", b"{}")]
    fresh = await first.accept(b'{"traced":1}', SIG, routes, 1000.0, trace=trace)
    assert fresh is not None
    assert [d.trace for d in fresh] == [trace, trace]
    await first.accept(b'{"traced":0}', SIG, [Route("t", None)], 1000.0)
    await first.close()
    again = await opener()
    claimed = await again.due(2000.0, {"t": 10, "u": 10})
    assert sorted((d.body, d.trace) for d in claimed) == [
        (b'{"traced":0}', None),
        (b'{"traced":1}', trace),
        (b"{}", trace),
    ]
    assert (await again.get(fresh[0].id)) == claimed[[d.id for d in claimed].index(fresh[0].id)]
