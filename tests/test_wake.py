"""Worker 0 learns of notifications other workers stored (gateway.runtime.wake), over real
sockets."""

from __future__ import annotations

import asyncio
import os

from gateway.runtime.wake import Bell, Doorbell, channel_name


async def test_ringing_the_bell_wakes_the_doorbells_owner_once_per_turn() -> None:
    name = channel_name(os.getpid()) + "-test"
    woken = asyncio.Event()
    rings: list[None] = []

    def wake() -> None:
        rings.append(None)
        woken.set()

    doorbell = Doorbell(name, wake)
    bell = Bell(name)
    try:
        for _ in range(50):  # fifty commits in one turn of the loop: one datagram
            bell.ring()
        await asyncio.wait_for(woken.wait(), timeout=5)
        await asyncio.sleep(0.05)  # room for any further datagram to arrive
        assert len(rings) == 1
    finally:
        bell.close()
        doorbell.close()


async def test_ringing_with_nobody_listening_is_harmless() -> None:
    bell = Bell(channel_name(os.getpid()) + "-nobody")
    try:
        bell.ring()
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the send ran, found no listener, and said nothing
    finally:
        bell.close()
