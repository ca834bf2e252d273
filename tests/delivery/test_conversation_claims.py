"""What an ordered target's claims ask the outbox about, seen from the target: a claim asks
about as many announced conversations as it has room for, and when those leave room unused
the next claim follows at once, not at the next poll."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conversations import Conversations, conversation_body, ordered_bot
from helpers import gateway_config, post
from pki import Pki

from gateway.config import DispatcherConfig
from gateway.delivery.ordering import FULL_EVERY_S
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
