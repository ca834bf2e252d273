"""A conversation's run goes on before the outcome of the delivery ahead is recorded: when
those records fail, what was not recorded is sent again, in order, and only ever as a second
send of a delivery the target already took in order."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import sys
import time
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


def _passes(numbers: list[int]) -> list[list[int]]:
    """The numbers split where one is not greater than the one before it: one pass each."""
    passes: list[list[int]] = [[]]
    for before, n in itertools.pairwise([-1, *numbers]):
        if n <= before:
            passes.append([])
        passes[-1].append(n)
    return passes


async def test_a_run_whose_outcome_records_fail_is_sent_again_in_order_from_the_first(
    pki: Pki, tmp_path: Path, target: Conversations
) -> None:
    """A backlog of one conversation drains as one run; as the target takes its first message
    another process takes the outbox's write lock for a second, so that message's record and
    those of the rest of the run (sent meanwhile, each after the one before it was answered)
    fail. The target sees the run once in order, then again from the first message, in order,
    until the records succeed; in the end every message is recorded delivered."""
    config = gateway_config(
        pki,
        tmp_path,
        targets=[ordered_bot(target)],
    )
    config = dataclasses.replace(
        config, outbox=dataclasses.replace(config.outbox, busy_timeout_s=0.3)
    )
    holders: list[asyncio.subprocess.Process] = []

    async def lock_the_outbox(user: str, n: int) -> None:
        if (user, n) == ("a", 0) and not holders:
            holder = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _HOLD,
                str(config.outbox.path),
                "1.0",
                stdout=asyncio.subprocess.PIPE,
            )
            holders.append(holder)
            assert holder.stdout is not None
            assert await holder.stdout.readline() == b"locked\n"

    await target.stop()
    async with Gateway(config) as gateway:
        for n in range(MESSAGES):
            assert (await post(gateway, pki, conversation_body("a", n))).status == 200
        target.before_answer = lock_the_outbox
        await target.start()
        await target.wait_for("a", MESSAGES)
        assert holders, "the first message never reached the target"
        assert await asyncio.wait_for(holders[0].wait(), DEADLINE_S) == 0
        deadline = time.monotonic() + DEADLINE_S
        while len(await gateway.outbox.query(state="delivered")) < MESSAGES:
            assert time.monotonic() < deadline, await gateway.outbox.query(state="pending")
            await asyncio.sleep(0.05)
        delivered = await gateway.outbox.query(state="delivered")
    passes = _passes(target.accepted["a"])
    assert passes[0] == list(range(MESSAGES))
    # Sent again: the first message's record was the first to fail, so every later pass
    # starts with it, and goes on in order.
    assert len(passes) >= 2
    assert all(again[0] == 0 for again in passes[1:]), passes
    assert max(d.attempts for d in delivered) >= 2
