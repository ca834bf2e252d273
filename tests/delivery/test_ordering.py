"""Ordered delivery per conversation, end to end: a conversation whose first delivery keeps
failing holds only itself back, and arrives in acknowledgement order once the target takes it;
in one process on each outbox backend, with two workers, and with two gateways on one
PostgreSQL database, one of them killed mid-way."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from config_files import host_configs, listen_port, write_config
from conversations import (
    Conversations,
    conversation_body,
    conversations_target,  # noqa: F401 (the fixture "target": pytest finds it here)
    in_order,
    ordered_bot,
)
from helpers import gateway_config, post
from pki import Pki
from processes import post_to, serving, serving_all, until_listening
from sink import DEADLINE_S

from gateway.config import Config, OutboxConfig
from gateway.delivery.ordering import RUN
from gateway.runtime.gateway import Gateway

USERS = ("a", "b", "c", "d")
PER_USER = 6
# The target's settings: quick retries, and a pipeline so that a conversation's deliveries
# could overtake each other if the gateway let them. Attempts enough that user a's refused first
# message is never dead-lettered while the test holds it (a dead letter releases its
# conversation, by design): 12 quick attempts end in about a second and a half, which a loaded
# machine's lease takeover outlasts.
ORDERED = 'order = "conversation"\ntimeout_s = 5\npipeline = 8\nattempts = 1000'


Send = Callable[[str, int], Awaitable[None]]


async def _converse(send: Send, target: Conversations) -> None:
    """Every user sends PER_USER messages, one after the other (each acknowledged before the
    next), the users at once; user a's first message is refused until the others are all in."""
    target.held.add(("a", 0))

    async def user(name: str) -> None:
        for n in range(PER_USER):
            await send(name, n)

    await asyncio.gather(*(user(name) for name in USERS))
    await target.wait_refused("a", 0, 2)
    await _others_then_a_in_order(target)


async def _others_then_a_in_order(target: Conversations) -> None:
    """Users b, c and d arrive in order while a's first message is refused; a holds only
    itself back, and arrives in order once the target takes it."""
    for other in USERS[1:]:
        assert in_order(await target.wait_for(other, PER_USER))
    # The others all arrived while a's first message was refused: a is held, and only a.
    assert target.accepted.get("a", []) == []
    target.held.clear()
    assert in_order(await target.wait_for("a", PER_USER))


def _bot(
    pki: Pki,
    tmp_path: Path,
    target: Conversations,
    backend: str = "sqlite",
    request: pytest.FixtureRequest | None = None,
    **options: Any,
) -> Config:
    """A gateway delivering in order per conversation to ``target`` (target "bot", with
    ``options``), its outbox on ``backend``."""
    # Attempts enough that a held message is never dead-lettered by their count alone (see
    # ORDERED).
    bot = ordered_bot(target, **({"attempts": 1000} | options))
    config = gateway_config(pki, tmp_path, targets=[bot])
    if backend == "postgres":
        assert request is not None  # the PostgreSQL server is a fixture
        outbox = OutboxConfig(url=request.getfixturevalue("pg_url"))
        config = dataclasses.replace(config, outbox=outbox)
    return config


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_a_failing_conversation_holds_only_itself_and_arrives_in_order(
    pki: Pki, tmp_path: Path, target: Conversations, backend: str, request: pytest.FixtureRequest
) -> None:
    """One gateway: while user a's first message is refused, b, c and d are delivered in
    order; a's messages arrive in order once it is taken."""
    config = _bot(pki, tmp_path, target, backend, request, pipeline=8)
    async with Gateway(config) as gateway:

        async def send(user: str, n: int) -> None:
            answer = await post(gateway, pki, conversation_body(user, n))
            assert answer.status == 200

        await _converse(send, target)


async def test_a_delivery_held_behind_its_conversation_is_not_aged_into_a_dead_letter(
    pki: Pki, tmp_path: Path, target: Conversations
) -> None:
    """max_age_s = 2.5, a retry every second: user a's first message fails until its age ends
    it (a dead letter, about 2 s in, which releases the conversation); the second, held behind
    it all that time, fails its first attempt once: it is retried and delivered, not
    dead-lettered for the time it waited; the third follows it."""
    config = _bot(pki, tmp_path, target, max_age_s=2.5, retry_schedule_s=(1.0,))
    target.held.add(("a", 0))
    target.failing[("a", 1)] = 1
    async with Gateway(config) as gateway:
        for n in range(3):
            assert (await post(gateway, pki, conversation_body("a", n))).status == 200
        assert await target.wait_for("a", 2) == [1, 2]
        assert target.refused[("a", 1)] == 1
        (dead,) = await gateway.outbox.query(state="dead")
        assert "max_age_s" in (dead.last_error or "")
        delivered = await gateway.outbox.query(state="delivered")
        assert sorted(d.attempts for d in delivered) == [1, 2]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_a_backlog_drains_in_runs_in_order_when_one_fails_mid_way(
    pki: Pki, tmp_path: Path, target: Conversations, backend: str, request: pytest.FixtureRequest
) -> None:
    """Stored while the target is down, each conversation drains in runs once it is back;
    b's fourth message fails twice in the middle of its run: the rest of b waits for it, and
    every conversation still arrives in order, each message once."""
    config = _bot(pki, tmp_path, target, backend, request)
    await target.stop()
    async with Gateway(config) as gateway:
        for n in range(PER_USER):
            for user in USERS:
                assert (await post(gateway, pki, conversation_body(user, n))).status == 200
        target.failing[("b", 3)] = 2
        await target.start()
        for user in USERS:
            assert await target.wait_for(user, PER_USER) == list(range(PER_USER))
        assert target.refused[("b", 3)] == 2


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_conversations_longer_than_a_run_go_on_past_it_in_order(
    pki: Pki, tmp_path: Path, target: Conversations, backend: str, request: pytest.FixtureRequest
) -> None:
    """Stored while the target is down, two conversations of three runs and more: each goes
    on past its first run (on SQLite what follows a run is read while the run goes), in
    order, each message once; b's message in its second run fails twice, and the rest of b
    waits for it."""
    long = 3 * RUN + 3
    config = _bot(pki, tmp_path, target, backend, request)
    await target.stop()
    async with Gateway(config) as gateway:
        for n in range(long):
            for user in ("a", "b"):
                assert (await post(gateway, pki, conversation_body(user, n))).status == 200
        target.failing[("b", RUN + 2)] = 2
        await target.start()
        for user in ("a", "b"):
            assert await target.wait_for(user, long) == list(range(long))
        assert target.refused[("b", RUN + 2)] == 2


def _sender(session: aiohttp.ClientSession, pki: Pki, port: Callable[[str, int], int]) -> Send:
    """Sends each message to the gateway listening on ``port(user, n)``, over mTLS."""

    async def send(user: str, n: int) -> None:
        assert await post_to(port(user, n), pki, conversation_body(user, n), session=session) == 200

    return send


async def test_conversations_stay_in_order_with_two_workers(
    pki: Pki, tmp_path: Path, target: Conversations
) -> None:
    """Two workers accept the messages, one dispatcher sends them: the same guarantee."""
    config = write_config(pki, tmp_path, target_url=target.url(), workers=2, extra=ORDERED)
    port = listen_port(config)
    with serving(config) as gateway:
        await until_listening(port, gateway)
        async with aiohttp.ClientSession() as session:
            await _converse(_sender(session, pki, lambda user, n: port), target)
        gateway.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(gateway.wait, DEADLINE_S) == 0


async def test_conversations_stay_in_order_across_two_gateways_when_one_is_killed(
    pki: Pki, tmp_path: Path, pg_url: str, target: Conversations
) -> None:
    """Two gateways on one PostgreSQL database take each conversation's messages in turn;
    one is killed (SIGKILL) half way, holding fresh claims: the survivor takes them over
    once their lease runs out, and every conversation still arrives in order."""
    configs = host_configs(
        pki,
        tmp_path,
        2,
        target_url=target.url(),
        outbox=f'url = "{pg_url}"\nlease_s = 1.5',
        extra=ORDERED,
    )
    ports = [listen_port(config) for config in configs]
    target.held.add(("a", 0))
    with contextlib.ExitStack() as stack:
        gateways = await serving_all(stack, configs)
        async with aiohttp.ClientSession() as session:
            both = _sender(session, pki, lambda user, n: ports[n % 2])
            survivor = _sender(session, pki, lambda user, n: ports[0])

            async def first_half(user: str) -> None:
                for n in range(PER_USER // 2):
                    await both(user, n)

            await asyncio.gather(*(first_half(user) for user in USERS))
            gateways[1].send_signal(signal.SIGKILL)
            assert await asyncio.to_thread(gateways[1].wait, DEADLINE_S) == -signal.SIGKILL

            async def second_half(user: str) -> None:
                for n in range(PER_USER // 2, PER_USER):
                    await survivor(user, n)

            await asyncio.gather(*(second_half(user) for user in USERS))
        await _others_then_a_in_order(target)
        gateways[0].send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(gateways[0].wait, DEADLINE_S) == 0
