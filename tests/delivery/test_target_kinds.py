"""Every target kind behaves the same: routing, split, signatures, retries, dead letters, replay.

Each test runs once per kind (HTTP sink, Redis stream, NATS JetStream, all real servers on
loopback) through the ``destination`` fixture, posts notifications as Meta would, and reads back
what the target holds: a broker entry's fields, or a message's headers, carry the same names as
an HTTP target's headers.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from destinations import Destination, wait_for
from helpers import (
    admin_get,
    admin_post,
    deliveries,
    eventually,
    gateway_config,
    message_body,
    meta_signature,
    post,
    wait_for_state,
)
from pki import Pki
from test_forwarding import BATCH, PHONE, TARGET_SECRET, TEMPLATE_WABA, envelope, gateway_signature

from gateway.config import Signature
from gateway.runtime.gateway import Gateway


async def test_routes_each_notification_to_the_targets_it_matches(
    pki: Pki, tmp_path: Path, destination: Destination
) -> None:
    """Targets whose filters match a change get the exact bytes once; the others nothing."""
    targets = [
        destination.target("everything"),
        destination.target("one_number", fields=("messages",), phone_number_ids=(PHONE,)),
        destination.target("templates", fields=("message_template_status_update",)),
        destination.target("crossed", fields=("messages",), waba_ids=(TEMPLATE_WABA,)),
    ]
    async with Gateway(gateway_config(pki, tmp_path, targets=targets)) as gateway:
        assert (await post(gateway, pki, BATCH)).status == 200
        await wait_for_state(gateway, "delivered", 3)
        assert sorted(d.target for d in await deliveries(gateway)) == [
            "everything",
            "one_number",
            "templates",
        ]
    for name in ("everything", "one_number", "templates"):
        (received,) = await destination.received(name)
        assert received.body == BATCH
        assert received.headers["X-Hub-Signature-256"] == meta_signature(BATCH)
        assert received.headers["X-Gateway-Attempt"] == "1"
    assert await destination.received("crossed") == []


async def test_splits_a_batch_into_one_envelope_per_matching_change(
    pki: Pki, tmp_path: Path, destination: Destination
) -> None:
    """``split = "change"``: one delivery per matching change, in Meta's minimal envelope."""
    targets = [destination.target("messages", fields=("messages",), split="change")]
    async with Gateway(gateway_config(pki, tmp_path, targets=targets)) as gateway:
        assert (await post(gateway, pki, BATCH)).status == 200
        await wait_for_state(gateway, "delivered", 2)
    found = sorted(json.dumps(json.loads(r.body)) for r in await destination.received("messages"))
    assert found == sorted(json.dumps(envelope(0, index)) for index in (0, 1))


@pytest.mark.parametrize("signature", ["gateway", "meta"])
async def test_signs_what_each_kind_receives_with_the_target_secret(
    pki: Pki, tmp_path: Path, destination: Destination, signature: Signature
) -> None:
    """The target's signature mode signs the exact bytes the target holds, for every kind."""
    targets = [destination.target("signed", secret=TARGET_SECRET, signature=signature)]
    async with Gateway(gateway_config(pki, tmp_path, targets=targets)) as gateway:
        assert (await post(gateway, pki, message_body("signed"))).status == 200
        (delivery,) = await wait_for_state(gateway, "delivered")
    (received,) = await destination.received("signed")
    assert received.headers["X-Gateway-Delivery-Id"] == delivery.id
    if signature == "meta":
        expected = meta_signature(received.body, TARGET_SECRET)
        assert received.headers["X-Hub-Signature-256"] == expected
        assert "X-Gateway-Signature-256" not in received.headers
    else:
        timestamp = received.headers["X-Gateway-Timestamp"]
        expected = gateway_signature(TARGET_SECRET, timestamp, received.body)
        assert received.headers["X-Gateway-Signature-256"] == expected


async def test_target_down_at_start_then_back_gets_every_delivery_once(
    pki: Pki, tmp_path: Path, destination: Destination
) -> None:
    """With the target down (from before the gateway starts) Meta still gets 200 and the
    deliveries stay pending, retried; once it is back each is delivered, exactly once."""
    await destination.down()
    targets = [destination.target("late", attempts=1000)]
    async with Gateway(gateway_config(pki, tmp_path, targets=targets)) as gateway:
        # Ready although its only target is down: readiness is about taking notifications.
        assert (await admin_get(gateway, "/readyz")).status == 200
        for text in ("one", "two", "three"):
            assert (await post(gateway, pki, message_body(text))).status == 200

        async def retried() -> bool:
            found = await deliveries(gateway, state="pending")
            return len(found) == 3 and all(d.attempts >= 2 for d in found)

        assert await eventually_true(retried)
        await destination.up()
        delivered = await wait_for_state(gateway, "delivered", 3)
    received = await wait_for(destination, 3, "late")
    ids = [r.headers["X-Gateway-Delivery-Id"] for r in received]
    assert sorted(ids) == sorted(d.id for d in delivered)
    assert all(int(r.headers["X-Gateway-Attempt"]) >= 2 for r in received)


async def test_dead_letters_after_attempts_then_replay_delivers(
    pki: Pki, tmp_path: Path, destination: Destination
) -> None:
    """A target down for every attempt makes a dead letter saying why; replayed once it is
    back, the delivery arrives with the same id."""
    await destination.down()
    targets = [destination.target("flaky", attempts=2)]
    async with Gateway(gateway_config(pki, tmp_path, targets=targets)) as gateway:
        assert (await post(gateway, pki, message_body("dead"))).status == 200
        (dead,) = await wait_for_state(gateway, "dead")
        assert "gave up after 2 attempt(s)" in (dead.last_error or "")
        await destination.up()
        answer = await admin_post(gateway, f"/admin/deliveries/{dead.id}/replay")
        assert answer.status == 200
        (delivered,) = await wait_for_state(gateway, "delivered")
    assert delivered.id == dead.id
    (received,) = await destination.received("flaky")
    assert received.headers["X-Gateway-Delivery-Id"] == dead.id
    assert received.body == message_body("dead")


async def eventually_true(probe: Callable[[], Awaitable[bool]]) -> bool:
    async def truthy() -> bool | None:
        return (await probe()) or None

    return await eventually(truthy, "the condition")


async def test_target_lost_while_connected_then_back_gets_every_delivery(
    pki: Pki, tmp_path: Path, destination: Destination
) -> None:
    """A target that goes away after deliveries went through (its connections dead in the
    pool) and comes back: what arrived meanwhile is retried on new connections, each once."""
    targets = [destination.target("blip", attempts=1000)]
    async with Gateway(gateway_config(pki, tmp_path, targets=targets)) as gateway:
        assert (await post(gateway, pki, message_body("before"))).status == 200
        await wait_for_state(gateway, "delivered")
        await destination.down()
        for text in ("during one", "during two"):
            assert (await post(gateway, pki, message_body(text))).status == 200

        async def retried() -> bool:
            found = await deliveries(gateway, state="pending")
            return len(found) == 2 and all(d.attempts >= 2 for d in found)

        assert await eventually_true(retried)
        await destination.up()
        delivered = await wait_for_state(gateway, "delivered", 3)
    received = await wait_for(destination, 3, "blip")
    ids = [r.headers["X-Gateway-Delivery-Id"] for r in received]
    assert sorted(ids) == sorted(d.id for d in delivered)
