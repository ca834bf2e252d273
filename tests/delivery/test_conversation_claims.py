"""What an ordered target's claims ask the outbox about, seen from the target: a claim asks
about as many announced conversations as it has room for, and when those leave room unused
the next claim follows at once, not at the next poll; and the place a run held in the budget
is free for the next delivery once its last delivery is answered, before that outcome is
recorded."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from conversations import Conversations, conversation_body, ordered_bot
from helpers import eventually, gateway_config, post
from pki import Pki

from gateway.config import Config, DispatcherConfig, OutboxConfig
from gateway.delivery.ordering import FULL_EVERY_S
from gateway.outbox import Delivery
from gateway.runtime.gateway import Gateway

# Far longer than the test waits: only a wake-up of the dispatcher can start a delivery.
POLL_S = 60.0
# What the test waits for a delivery that only a claim can start.
WITHIN_S = 10.0
# The poll that brings a failing target its probes, in the test of a target answering again.
PROBE_POLL_S = 1.0


@pytest.fixture
async def target() -> AsyncIterator[Conversations]:
    conversations = Conversations()
    await conversations.start()
    yield conversations
    await conversations.stop()


async def test_a_claim_whose_conversations_had_nothing_due_lets_the_next_one_ask_at_once(
    pki: Pki, tmp_path: Path, target: Conversations
) -> None:
    """Room for two deliveries; user s's first message and user x's are out, their answers
    held. s's second message waits behind s's first, d's first for room: s is announced
    before d. x's answer frees one place: the claim that follows has room to ask about one
    conversation, s, whose first message is still out, so nothing starts. d's message is
    delivered anyway, by the claim right after it (the poll is a minute away), while s's first
    answer is still held; then s's second, in order."""
    release = {"s": asyncio.Event(), "x": asyncio.Event()}

    async def hold(user: str, n: int) -> None:
        if n == 0 and user in release:
            await release[user].wait()

    target.before_answer = hold
    config = gateway_config(pki, tmp_path, targets=[ordered_bot(target, pipeline=1)])
    config = dataclasses.replace(
        config, dispatcher=DispatcherConfig(poll_interval_s=POLL_S, batch_size=2)
    )
    async with Gateway(config) as gateway:
        for user in ("s", "x"):
            assert (await post(gateway, pki, conversation_body(user, 0))).status == 200
        await target.wait_for("s", 1)
        await target.wait_for("x", 1)
        assert (await post(gateway, pki, conversation_body("s", 1))).status == 200
        assert (await post(gateway, pki, conversation_body("d", 0))).status == 200
        await asyncio.sleep(0.2)
        assert "d" not in target.accepted  # no room for it yet
        release["x"].set()
        async with asyncio.timeout(WITHIN_S):
            await target.wait_for("d", 1)
        assert target.accepted["s"] == [0]  # still held: no delivery of s ended meanwhile
        release["s"].set()
        assert await target.wait_for("s", 2) == [0, 1]


async def test_a_target_that_answers_again_gets_every_conversation_that_waited_at_once(
    pki: Pki, tmp_path: Path, target: Conversations
) -> None:
    """The target fails while thirteen conversations' first messages arrive; its probes (room
    for one, on the poll interval, here a second) each look at every conversation, and such a
    look names only eight beyond its room. Once a probe is answered, the next claim looks at
    every conversation with the whole budget: all thirteen arrive together, not eight and the
    rest a poll later."""
    users = [f"u{n}" for n in range(13)]
    target.held.update((user, 0) for user in users)
    arrived: list[float] = []

    async def clock(user: str, n: int) -> None:
        arrived.append(time.monotonic())

    target.before_answer = clock
    config = gateway_config(pki, tmp_path, targets=[ordered_bot(target)])
    config = dataclasses.replace(
        config, dispatcher=DispatcherConfig(poll_interval_s=PROBE_POLL_S, batch_size=32)
    )
    async with Gateway(config) as gateway:
        assert (await post(gateway, pki, conversation_body("u0", 0))).status == 200
        await target.wait_refused("u0", 0, 1)
        for user in users[1:]:
            assert (await post(gateway, pki, conversation_body(user, 0))).status == 200
        # A probe after the last of them, which looked at every conversation.
        await asyncio.sleep(FULL_EVERY_S + PROBE_POLL_S + 0.2)
        assert not target.accepted
        target.held.clear()
        async with asyncio.timeout(WITHIN_S):
            for user in users:
                assert await target.wait_for(user, 1) == [0]
    assert max(arrived) - min(arrived) < PROBE_POLL_S / 2, arrived


async def test_a_run_gives_its_place_back_at_its_answer_not_at_its_record(
    pki: Pki, tmp_path: Path, target: Conversations, pg_url: str
) -> None:
    """Room for one delivery, on PostgreSQL. User a's message is answered while another
    connection holds a lock on its row, so its outcome cannot be recorded. User b's message,
    stored then, is delivered all the same: a's run ended with that answer, and its place went
    to b at once rather than once the record commits. When the lock goes, a's outcome is
    recorded: delivered, after one attempt. (On SQLite one writer runs records and claims in
    turn, so no lock can hold the one and not the other: there the place freed at the answer
    lets the next claim take the record's commit along with its read.)"""
    async with (
        _records_held(target, pg_url, ("a",)) as locked,
        Gateway(_one_place(pki, tmp_path, target, pg_url)) as gateway,
    ):
        assert (await post(gateway, pki, conversation_body("a", 0))).status == 200
        async with asyncio.timeout(WITHIN_S):
            await locked["a"].wait()
        assert (await post(gateway, pki, conversation_body("b", 0))).status == 200
        async with asyncio.timeout(WITHIN_S):
            assert await target.wait_for("b", 1) == [0]
        await _until_delivered(gateway, 1)  # b's outcome
        # a's outcome is still unrecorded: the lock holds it.
        assert [d.attempts for d in await gateway.outbox.query(state="pending")] == [0]
        await locked.release()
        delivered = await _until_delivered(gateway, 2)
        assert sorted(d.attempts for d in delivered) == [1, 1]
        assert target.accepted == {"a": [0], "b": [0]}


async def test_no_more_places_go_back_ahead_of_their_records_than_the_budget(
    pki: Pki, tmp_path: Path, target: Conversations, pg_url: str
) -> None:
    """Room for one delivery, on PostgreSQL, and the records of users a's and b's outcomes
    held by locks on their rows. a's place goes back at its answer, one budget's worth ahead of
    the records: b's message is delivered. b's place does not: outcomes that cannot be recorded
    must not pile up in memory. So c's message waits, and arrives once the records are made."""
    async with (
        _records_held(target, pg_url, ("a", "b")) as locked,
        Gateway(_one_place(pki, tmp_path, target, pg_url)) as gateway,
    ):
        for user in ("a", "b"):
            assert (await post(gateway, pki, conversation_body(user, 0))).status == 200
            async with asyncio.timeout(WITHIN_S):
                await locked[user].wait()
        assert (await post(gateway, pki, conversation_body("c", 0))).status == 200
        await asyncio.sleep(0.5)
        assert "c" not in target.accepted  # b's place waits for b's record
        await locked.release()
        async with asyncio.timeout(WITHIN_S):
            assert await target.wait_for("c", 1) == [0]
        delivered = await _until_delivered(gateway, 3)
        assert sorted(d.attempts for d in delivered) == [1, 1, 1]


def _one_place(pki: Pki, tmp_path: Path, target: Conversations, pg_url: str) -> Config:
    """A gateway on PostgreSQL whose ordered target has room for one delivery, no pipeline."""
    config = gateway_config(pki, tmp_path, targets=[ordered_bot(target, pipeline=1)])
    return dataclasses.replace(
        config,
        outbox=OutboxConfig(url=pg_url),
        dispatcher=DispatcherConfig(poll_interval_s=POLL_S, batch_size=1),
    )


class _Locks(dict[str, asyncio.Event]):
    """Per user, set once the rows of the pending deliveries were locked at that user's
    answer; :meth:`release` ends the lock."""

    def __init__(self, connection: asyncpg.Connection, users: tuple[str, ...]) -> None:
        super().__init__((user, asyncio.Event()) for user in users)
        self.connection = connection

    async def release(self) -> None:
        await self.connection.execute("ROLLBACK")


@contextlib.asynccontextmanager
async def _records_held(
    target: Conversations, pg_url: str, users: tuple[str, ...]
) -> AsyncIterator[_Locks]:
    """As the target answers the first message of each of ``users``, another connection locks
    the rows of every pending delivery (that user's among them), in one transaction: the
    record of that outcome waits for the lock until released."""
    blocker = await asyncpg.connect(pg_url)
    locks = _Locks(blocker, users)

    async def lock(user: str, n: int) -> None:
        if n == 0 and user in locks:
            if not blocker.is_in_transaction():
                await blocker.execute("BEGIN")
            await blocker.execute(
                "SELECT 1 FROM waba_gateway.deliveries WHERE state = 'pending' FOR UPDATE"
            )
            locks[user].set()

    target.before_answer = lock
    try:
        yield locks
    finally:
        await blocker.close()


async def _until_delivered(gateway: Gateway, count: int) -> list[Delivery]:
    """The outbox's delivered deliveries, once there are ``count`` of them."""

    async def delivered() -> list[Delivery] | None:
        found = await gateway.outbox.query(state="delivered")
        return found if len(found) >= count else None

    return await eventually(delivered, f"{count} delivered")
