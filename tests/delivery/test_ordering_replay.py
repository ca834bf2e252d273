"""An operator's replay of a delivery that waits in memory, in a conversation's run behind the
one being sent: it goes to the back of its conversation, as a replay does anywhere else, from
whichever front door it came (this gateway's admin API, the command line writing to the
outbox, another gateway's admin API on a shared database)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from config_files import write_config
from conversations import (
    Conversations,
    conversation_body,
    conversations_target,  # noqa: F401 (the fixture "target": pytest finds it here)
    ordered_bot,
)
from helpers import APP_SECRET, admin_post, eventually, gateway_config, post
from pki import Pki

from gateway.config import Config, OutboxConfig
from gateway.outbox import Delivery
from gateway.runtime.gateway import Gateway

MESSAGES = 5


def _number(delivery: Delivery) -> int:
    value = json.loads(delivery.body)["entry"][0]["changes"][0]["value"]
    return int(value["messages"][0]["text"]["body"])


async def _stored(gateway: Gateway, pki: Pki, count: int) -> dict[int, str]:
    """Messages 0 to ``count - 1`` of one conversation accepted (its target down): the id of
    each one's delivery, by number."""
    for n in range(count):
        assert (await post(gateway, pki, conversation_body("a", n))).status == 200
    return {_number(d): d.id for d in await gateway.outbox.query(state="pending")}


class _Overlaps:
    """The sends of each message open at the target at once, and those that ever overlapped
    another send of the same message."""

    def __init__(self) -> None:
        self.open: dict[int, int] = {}
        self.overlapping: list[int] = []

    @contextlib.asynccontextmanager
    async def send(self, n: int) -> AsyncIterator[None]:
        self.open[n] = self.open.get(n, 0) + 1
        if self.open[n] > 1:
            self.overlapping.append(n)
        try:
            yield
        finally:
            self.open[n] -= 1


async def _all_recorded(gateway: Gateway) -> None:
    async def settled() -> bool | None:
        return (await gateway.outbox.counts())["pending"] == 0 or None

    await eventually(settled, "every delivery recorded")


async def test_a_delivery_replayed_while_it_waits_in_a_run_goes_to_the_back_of_its_conversation(
    pki: Pki, tmp_path: Path, target: Conversations
) -> None:
    """A backlog of one conversation, stored while the target is down, drains as one run:
    while the target holds the answer to message 0, the rest of the run waits in memory, and
    the operator replays message 2 through the admin API. The target receives 0, 1, 3, 4 and
    then 2, each once: the replayed message at the back, as the outbox now orders it."""
    config = _bot(pki, tmp_path, target)
    await target.stop()
    async with Gateway(config) as gateway:
        pending = await _stored(gateway, pki, MESSAGES)
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


def _bot(pki: Pki, folder: Path, target: Conversations) -> Config:
    # The target holds its answer while a command starts: no timeout may cut that short.
    return gateway_config(pki, folder, targets=[ordered_bot(target, timeout_s=60.0)])


async def _replayed_while_message_0_is_answered(
    gateway: Gateway, pki: Pki, target: Conversations, replay: Callable[[str], Awaitable[None]]
) -> list[int]:
    """Store messages 0 to 4 of one conversation with the target down, bring it up, and while
    it holds its answer to message 0 (the rest of the run waiting in memory) replay message 2
    with ``replay``; once every outcome is recorded: what the target received, in order."""
    await target.stop()
    pending = await _stored(gateway, pki, MESSAGES)
    replayed: list[str] = []

    async def replay_the_third(user: str, n: int) -> None:
        if (user, n) == ("a", 0) and not replayed:
            replayed.append(pending[2])
            await replay(pending[2])

    target.before_answer = replay_the_third
    await target.start()
    await target.wait_for("a", MESSAGES)
    assert replayed

    await _all_recorded(gateway)
    return target.accepted["a"]


async def test_a_delivery_replayed_from_the_command_line_while_it_waits_in_a_run_goes_last(
    pki: Pki, tmp_path: Path, target: Conversations
) -> None:
    """``waba-gateway deliveries replay ID``, a process of its own writing to the outbox file,
    replays message 2 while the gateway holds it in memory in a run: the gateway hears of it
    and the target receives it at the back of its conversation, once."""
    config = _bot(pki, tmp_path, target)
    cli = write_config(
        pki, tmp_path, target_url=target.url(), outbox=f'path = "{config.outbox.path}"'
    )

    async def replay(delivery_id: str) -> None:
        command = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "deliveries",
            "replay",
            "--config",
            str(cli),
            delivery_id,
            env=os.environ | {"TEST_APP_SECRET": APP_SECRET},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await command.communicate()
        assert command.returncode == 0, out.decode()

    async with Gateway(config) as gateway:
        got = await _replayed_while_message_0_is_answered(gateway, pki, target, replay)
    # The command has told the gateway before it exits: the run lets 2 go before it reaches it.
    assert got == [0, 1, 3, 4, 2]


async def test_a_delivery_replayed_through_another_gateways_admin_goes_last(
    pki: Pki, tmp_path: Path, target: Conversations, pg_url: str
) -> None:
    """Two gateways on one PostgreSQL database: the one with the target holds message 2 in a
    run, the other one's admin API replays it; the first hears of it (LISTEN/NOTIFY) and the
    target receives it at the back of its conversation, once."""
    shared = OutboxConfig(url=pg_url)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    holder = dataclasses.replace(_bot(pki, tmp_path / "a", target), outbox=shared)
    # No targets: it claims nothing, and only its admin API acts on the shared outbox.
    other = dataclasses.replace(gateway_config(pki, tmp_path / "b"), outbox=shared)
    async with Gateway(holder) as gateway, Gateway(other) as admin:

        async def replay(delivery_id: str) -> None:
            answer = await admin_post(admin, f"/admin/deliveries/{delivery_id}/replay")
            assert answer.status == 200

        got = await _replayed_while_message_0_is_answered(gateway, pki, target, replay)
    # The announcement travels through the database to the holder's listener: when the run
    # reached 2 first (a loaded machine), 2 went once in its old place too, and its replay
    # still stood and sent it last. Either way 2 arrives last, the rest once and in order.
    assert got[-1] == 2
    assert [n for n in got if n != 2] == [0, 1, 3, 4]


async def test_replaying_the_delivery_being_sent_lets_its_run_go_and_sends_each_once(
    pki: Pki, tmp_path: Path, target: Conversations
) -> None:
    """Messages 0 to 4 of one conversation stored with the target down: once it is back, 0
    probes it, then 1 goes with 2, 3 and 4 waiting behind it in memory. While the target holds
    its answer to 1, the operator replays 1, which puts it behind 2, 3 and 4: those go once
    each, none while another send of the same message is open, and 1 goes again last. (The
    run used to stay behind 1 while a claim started 2 with a run of its own: 2, 3 and 4 went
    twice, two sends of 2 at once.)"""
    config = _bot(pki, tmp_path, target)
    await target.stop()
    async with Gateway(config) as gateway:
        pending = await _stored(gateway, pki, MESSAGES)
        overlaps = _Overlaps()

        async def replay_1_while_it_is_answered(user: str, n: int) -> None:
            async with overlaps.send(n):
                if n == 1 and target.accepted["a"].count(1) == 1:
                    answer = await admin_post(gateway, f"/admin/deliveries/{pending[1]}/replay")
                    assert answer.status == 200
                    await asyncio.sleep(0.3)  # the claim the replay wakes runs meanwhile
                elif n == 2 and target.accepted["a"].count(2) == 1:
                    await asyncio.sleep(0.3)  # a second send of 2 would come now

        target.before_answer = replay_1_while_it_is_answered
        await target.start()
        await target.wait_for("a", MESSAGES)

        await _all_recorded(gateway)
        assert target.accepted["a"] == [0, 1, 2, 3, 4, 1]
        assert overlaps.overlapping == []


async def test_a_delivery_replayed_while_a_run_reads_what_follows_it_goes_last(
    pki: Pki, tmp_path: Path, target: Conversations, pg_url: str
) -> None:
    """PostgreSQL (whose claims hand out runs). Twelve messages of one conversation drain in
    runs, each reading what follows it near
    its end. The operator replays message 9 after such a read has found 8 to 11 and before its
    answer reaches the run (the outbox's own ``following`` runs; the replay goes through the
    admin API at that moment): 9 is cut from the run with what follows it, so 10 and 11 go
    before 9, and 9 once, last. (The read used to be taken whole: 9 went before 10 and 11,
    ahead of its replayed place, and again last.)"""
    messages = 12
    config = dataclasses.replace(_bot(pki, tmp_path, target), outbox=OutboxConfig(url=pg_url))
    await target.stop()
    async with Gateway(config) as gateway:
        pending = await _stored(gateway, pki, messages)
        outbox = gateway.outbox
        read = outbox.following
        replayed: list[str] = []

        async def following(
            now: float, target: str, after: Mapping[str, str], length: int
        ) -> dict[str, list[Delivery]]:
            found = await read(now, target, after, length)
            if not replayed and any(d.id == pending[9] for run in found.values() for d in run):
                replayed.append(pending[9])
                answer = await admin_post(gateway, f"/admin/deliveries/{pending[9]}/replay")
                assert answer.status == 200
            return found

        outbox.following = following  # type: ignore[method-assign]

        async def slow_5_to_7(user: str, n: int) -> None:
            if n in (5, 6, 7):  # the read of what follows 7 is asked for meanwhile
                await asyncio.sleep(0.1)

        target.before_answer = slow_5_to_7
        await target.start()
        await target.wait_for("a", messages)

        await _all_recorded(gateway)
        assert replayed
        assert target.accepted["a"] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 9]


async def test_a_delivery_replayed_while_a_claim_reads_its_conversation_goes_last(
    pki: Pki, tmp_path: Path, target: Conversations, pg_url: str
) -> None:
    """PostgreSQL (whose claims hand out runs). Messages 0 to 4 of one conversation stored
    while the target refuses 0 (503). A claim reads the conversation with 2 behind the
    delivery it starts; the operator replays 2 after that read and before its answer reaches
    the dispatcher (the outbox's own ``due`` runs; the replay goes through the admin API at
    that moment). Nothing of the conversation starts from that answer: the next claim reads
    it in its new order, and the target receives 0, 1, 3, 4, then 2, each once. (The answer
    used to be taken as read: 2 went before 3 and 4, and again last.) The target refuses 0
    rather than being down, so that no run made before the five are stored sends 1 to 3 from
    memory: 0's refusal lets it go, and 2 comes back through a claim."""
    config = dataclasses.replace(_bot(pki, tmp_path, target), outbox=OutboxConfig(url=pg_url))
    target.held.add(("a", 0))
    async with Gateway(config) as gateway:
        outbox = gateway.outbox
        claim = outbox.due
        pending: dict[int, str] = {}
        replayed: list[str] = []

        async def due(*args: Any, **kwargs: Any) -> list[Delivery]:
            found = await claim(*args, **kwargs)
            # Once all five are stored: the first claim whose answer holds 2 (behind 0 or 1,
            # which went before it). Every run that holds 2 starts from such an answer: 0 is
            # refused until then, and a run behind a refused delivery is let go.
            if pending and not replayed and pending[2] in {d.id for d in found}:
                replayed.append(pending[2])
                answer = await admin_post(gateway, f"/admin/deliveries/{pending[2]}/replay")
                assert answer.status == 200
            return found

        outbox.due = due  # type: ignore[method-assign]
        pending.update(await _stored(gateway, pki, MESSAGES))
        await target.wait_refused("a", 0, 1)
        target.held.discard(("a", 0))
        await target.wait_for("a", MESSAGES)

        await _all_recorded(gateway)
        assert replayed
        assert target.accepted["a"] == [0, 1, 3, 4, 2]


async def test_a_delivery_replayed_while_a_claim_hands_out_the_one_before_it_goes_last(
    pki: Pki, tmp_path: Path, target: Conversations
) -> None:
    """SQLite (whose claims hand out one delivery of a conversation at a time). Messages 0 to
    4 of one conversation stored with the target down. Once 0 has probed it back, a claim
    hands out 1 alone, nothing behind it; the operator replays 2 after that claim and before
    its answer reaches the dispatcher (the outbox's own ``due`` runs; the replay goes through
    the admin API at that moment), so while 1 is out. The later claims hand out the rest in
    their new order: the target receives 0, 1, 3, 4, then 2, each once."""
    config = _bot(pki, tmp_path, target)
    await target.stop()
    async with Gateway(config) as gateway:
        pending = await _stored(gateway, pki, MESSAGES)
        outbox = gateway.outbox
        claim = outbox.due
        handed_with_1: list[list[str]] = []

        async def due(*args: Any, **kwargs: Any) -> list[Delivery]:
            found = await claim(*args, **kwargs)
            ids = [d.id for d in found]
            if not handed_with_1 and pending[1] in ids:
                handed_with_1.append(ids)
                answer = await admin_post(gateway, f"/admin/deliveries/{pending[2]}/replay")
                assert answer.status == 200
            return found

        outbox.due = due  # type: ignore[method-assign]
        await target.start()
        await target.wait_for("a", MESSAGES)

        await _all_recorded(gateway)
        assert handed_with_1 == [[pending[1]]]
        assert target.accepted["a"] == [0, 1, 3, 4, 2]


async def test_a_delivery_replayed_while_one_gateway_sends_it_is_not_sent_by_another_beside_it(
    pki: Pki, tmp_path: Path, target: Conversations, pg_url: str
) -> None:
    """Two gateways with the same ordered target on one PostgreSQL database. While the target
    holds its answer to message 0 from gateway A, the operator replays 0 through gateway B's
    admin API: B hears of it, but 0 is A's (A's lease on it still runs), so B does not send it
    beside A's open send; A sends it again once its send ends. (The replay used to clear the
    lease, and B sent 0 at once, two sends of it open together.)"""
    shared = OutboxConfig(url=pg_url)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    bot = ordered_bot(target, timeout_s=60.0)
    a_config, b_config = (
        dataclasses.replace(gateway_config(pki, tmp_path / name, targets=[bot]), outbox=shared)
        for name in ("a", "b")
    )
    overlaps = _Overlaps()
    async with Gateway(a_config) as a, Gateway(b_config) as b:
        replayed: list[str] = []

        async def replay_0_through_b(user: str, n: int) -> None:
            async with overlaps.send(n):
                if n == 0 and not replayed:
                    (delivery,) = await a.outbox.query(state="pending")
                    replayed.append(delivery.id)
                    answer = await admin_post(b, f"/admin/deliveries/{delivery.id}/replay")
                    assert answer.status == 200
                    await asyncio.sleep(1.0)  # B's claims run meanwhile

        target.before_answer = replay_0_through_b
        assert (await post(a, pki, conversation_body("a", 0))).status == 200

        async def sent_again() -> bool | None:
            return target.accepted.get("a", []).count(0) >= 2 or None

        await eventually(sent_again, "message 0 sent again after its replay")
    assert replayed
    assert overlaps.overlapping == []
