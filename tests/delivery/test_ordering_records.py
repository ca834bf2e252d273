"""When the outcome of a conversation's delivery cannot be recorded, what was not recorded is
sent again, in order, and only ever as a second send of a delivery the target already took in
order. On SQLite a claim hands out one delivery of a conversation at a time, the next once the
outcome of the one before is committed: a record that fails holds the rest back, and only that
delivery goes again. On PostgreSQL a conversation's run goes on before the outcome of the
delivery ahead is recorded: when those records fail, the run is sent again from its first."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from conversations import (
    Conversations,
    conversation_body,
    conversations_target,  # noqa: F401 (the fixture "target": pytest finds it here)
    ordered_bot,
)
from helpers import gateway_config, post
from pki import Pki
from sink import DEADLINE_S

from gateway.config import OutboxConfig
from gateway.errors import OutboxError
from gateway.outbox import AttemptResult, Delivery, Outcome
from gateway.runtime.gateway import Gateway

MESSAGES = 6
# Holds the outbox file's write lock from another process, as a backup tool or a stuck
# process would: the gateway's records fail after its busy timeout, its claims still read.
_HOLD = (
    "import sqlite3, sys, time\n"
    "conn = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
    "conn.execute('BEGIN EXCLUSIVE')\n"
    "print('locked', flush=True)\n"
    "time.sleep(float(sys.argv[2]))\n"
    "conn.execute('COMMIT')\n"
)
# How long the records fail once the target has taken the first message, and how long each
# waits before it fails (SQLite: the busy timeout).
FAILING_S = 1.0
WAITS_S = 0.3


def _passes(numbers: list[int]) -> list[list[int]]:
    """The numbers split where one is not greater than the one before it: one pass each."""
    passes: list[list[int]] = [[]]
    for before, n in itertools.pairwise([-1, *numbers]):
        if n <= before:
            passes.append([])
        passes[-1].append(n)
    return passes


def _number(delivery: Delivery) -> int:
    value = json.loads(delivery.body)["entry"][0]["changes"][0]["value"]
    return int(value["messages"][0]["text"]["body"])


async def _all_delivered(gateway: Gateway) -> dict[int, Delivery]:
    """Once every message is recorded delivered: each one's delivery, by number."""
    deadline = time.monotonic() + DEADLINE_S
    while len(await gateway.outbox.query(state="delivered")) < MESSAGES:
        assert time.monotonic() < deadline, await gateway.outbox.query(state="pending")
        await asyncio.sleep(0.05)
    return {_number(d): d for d in await gateway.outbox.query(state="delivered")}


async def _stored_then_target_up(gateway: Gateway, pki: Pki, target: Conversations) -> None:
    """Messages 0 to MESSAGES - 1 of one conversation stored while the target is down (the
    fixture's target is stopped first), then the target started: a backlog."""
    for n in range(MESSAGES):
        assert (await post(gateway, pki, conversation_body("a", n))).status == 200
    await target.start()


async def test_a_delivery_whose_record_fails_is_sent_again_before_the_rest_of_its_conversation(
    pki: Pki, tmp_path: Path, target: Conversations
) -> None:
    """SQLite. A backlog of one conversation; as the target takes its first message another
    process takes the outbox's write lock for a second, so that message's record fails (the
    claims still read). Nothing after it goes while its outcome is unrecorded: the target
    takes the first message again, as many times as its records fail, and then the rest once
    each, in order. Every pass it sees starts with the first message, and in the end every
    message is recorded delivered; the first after more than one attempt, the rest after
    one."""
    config = gateway_config(
        pki,
        tmp_path,
        targets=[ordered_bot(target)],
    )
    config = dataclasses.replace(
        config, outbox=dataclasses.replace(config.outbox, busy_timeout_s=WAITS_S)
    )
    holders: list[asyncio.subprocess.Process] = []

    async def lock_the_outbox(user: str, n: int) -> None:
        if (user, n) == ("a", 0) and not holders:
            holder = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _HOLD,
                str(config.outbox.path),
                str(FAILING_S),
                stdout=asyncio.subprocess.PIPE,
            )
            holders.append(holder)
            assert holder.stdout is not None
            assert await holder.stdout.readline() == b"locked\n"

    await target.stop()
    async with Gateway(config) as gateway:
        target.before_answer = lock_the_outbox
        await _stored_then_target_up(gateway, pki, target)
        await target.wait_for("a", MESSAGES)
        assert holders, "the first message never reached the target"
        assert await asyncio.wait_for(holders[0].wait(), DEADLINE_S) == 0
        delivered = await _all_delivered(gateway)
    got = target.accepted["a"]
    again = got.count(0)
    # Sent again while its record failed, and before anything after it: every pass starts
    # with the first message, and the rest go once each, in order, in the last.
    assert again >= 2, got
    assert got == [0] * again + list(range(1, MESSAGES))
    assert delivered[0].attempts >= 2
    assert [delivered[n].attempts for n in range(1, MESSAGES)] == [1] * (MESSAGES - 1)


async def test_a_run_whose_outcome_records_fail_is_sent_again_in_order_from_the_first(
    pki: Pki, tmp_path: Path, target: Conversations, pg_url: str
) -> None:
    """PostgreSQL. A backlog of one conversation drains as one run; from the moment the target
    takes its first message, every record of an outcome fails for a second (as when the
    database does not answer in time), so that message's record and those of the rest of the
    run (sent meanwhile, each after the one before it was answered) fail. The target sees the
    run once in order, then again from the first message, in order, until the records
    succeed; in the end every message is recorded delivered."""
    config = dataclasses.replace(
        gateway_config(pki, tmp_path, targets=[ordered_bot(target)]),
        outbox=OutboxConfig(url=pg_url),
    )
    failing_until: list[float] = []
    failed: list[int] = []

    async def fail_the_records_from_now(user: str, n: int) -> None:
        if (user, n) == ("a", 0) and not failing_until:
            failing_until.append(time.monotonic() + FAILING_S)

    await target.stop()
    async with Gateway(config) as gateway:
        outbox = gateway.outbox
        record = outbox.record_many

        async def record_many(
            attempts: Sequence[tuple[str, Outcome, AttemptResult]],
            now: float,
            created: Mapping[str, float] | None = None,
            patient: bool = False,
        ) -> None:
            if failing_until and time.monotonic() < failing_until[0]:
                # Fails as a record that waits for the database does: after a while.
                await asyncio.sleep(WAITS_S)
                failed.append(len(attempts))
                raise OutboxError(f"outbox write failed: no answer within {WAITS_S:g} s")
            await record(attempts, now, created, patient)

        outbox.record_many = record_many  # type: ignore[method-assign]
        target.before_answer = fail_the_records_from_now
        await _stored_then_target_up(gateway, pki, target)
        await target.wait_for("a", MESSAGES)
        assert failing_until, "the first message never reached the target"
        delivered = await _all_delivered(gateway)
    assert sum(failed) >= MESSAGES
    passes = _passes(target.accepted["a"])
    assert passes[0] == list(range(MESSAGES))
    # Sent again: the first message's record was the first to fail, so every later pass
    # starts with it, and goes on in order.
    assert len(passes) >= 2
    assert all(again[0] == 0 for again in passes[1:]), passes
    assert sorted(delivered) == list(range(MESSAGES))
