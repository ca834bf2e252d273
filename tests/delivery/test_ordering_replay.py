"""An operator's replay of a delivery that waits in memory, in a conversation's run behind the
one being sent: it goes to the back of its conversation, as a replay does anywhere else."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conversations import Conversations, conversation_body
from helpers import admin_post, gateway_config, post
from pki import Pki

from gateway.config import TargetConfig
from gateway.outbox import Delivery
from gateway.runtime.gateway import Gateway

MESSAGES = 5


@pytest.fixture
async def target() -> AsyncIterator[Conversations]:
    conversations = Conversations()
    await conversations.start()
    yield conversations
    await conversations.stop()


def _number(delivery: Delivery) -> int:
    value = json.loads(delivery.body)["entry"][0]["changes"][0]["value"]
    return int(value["messages"][0]["text"]["body"])


async def test_a_delivery_replayed_while_it_waits_in_a_run_goes_to_the_back_of_its_conversation(
    pki: Pki, tmp_path: Path, target: Conversations
) -> None:
    """A backlog of one conversation, stored while the target is down, drains as one run:
    while the target holds the answer to message 0, the rest of the run waits in memory, and
    the operator replays message 2 through the admin API. The target receives 0, 1, 3, 4 and
    then 2, each once: the replayed message at the back, as the outbox now orders it."""
    config = gateway_config(
        pki,
        tmp_path,
        targets=[
            TargetConfig(
                name="bot",
                url=target.url(),
                order="conversation",
                wait_initial_s=0.05,
                wait_max_s=0.1,
            )
        ],
    )
    await target.stop()
    async with Gateway(config) as gateway:
        for n in range(MESSAGES):
            assert (await post(gateway, pki, conversation_body("a", n))).status == 200
        pending = {_number(d): d.id for d in await gateway.outbox.query(state="pending")}
        replayed: list[int] = []

        async def replay_the_third(user: str, n: int) -> None:
            if (user, n) == ("a", 0) and not replayed:
                answer = await admin_post(gateway, f"/admin/deliveries/{pending[2]}/replay")
                assert answer.status == 200
                replayed.append(answer.status)

        target.before_answer = replay_the_third
        await target.start()
        assert await target.wait_for("a", MESSAGES) == [0, 1, 3, 4, 2]
        assert replayed
