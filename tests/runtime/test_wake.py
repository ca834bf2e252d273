"""Worker 0 learns of notifications other workers stored (gateway.runtime.wake), over real
sockets."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Iterator

import pytest

from gateway.runtime.wake import Bell, Doorbell, channel_name


@contextlib.contextmanager
def _listening(name: str) -> Iterator[socket.socket]:
    """A plain datagram socket on ``name``, to count what a bell sends."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.setblocking(False)
    listener.bind(name)
    try:
        yield listener
    finally:
        listener.close()


def _queued(listener: socket.socket) -> int:
    """How many datagrams are waiting on ``listener`` (read, so no longer waiting)."""
    count = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            listener.recv(16)
            count += 1
    return count


async def test_fifty_rings_in_one_turn_send_one_datagram() -> None:
    """Fifty commits in one turn of the loop send one datagram; a ring in a later turn sends
    another."""
    name = channel_name(os.getpid()) + "-count"
    bell = Bell(name)
    try:
        with _listening(name) as listener:
            for _ in range(50):
                bell.ring()
            await asyncio.sleep(0)  # the bell's send was scheduled first: it has run
            assert _queued(listener) == 1
            bell.ring()
            await asyncio.sleep(0)
            assert _queued(listener) == 1
    finally:
        bell.close()


async def test_the_doorbell_wakes_once_per_read_and_drains_what_is_queued() -> None:
    """Three datagrams queued before the doorbell reads: one wake, nothing left behind; a
    later datagram wakes it again."""
    name = channel_name(os.getpid()) + "-test"
    woken = asyncio.Event()
    rings: list[None] = []

    def wake() -> None:
        rings.append(None)
        woken.set()

    doorbell = Doorbell(name, wake)
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        for _ in range(3):
            sender.sendto(b"!", name)
        await asyncio.wait_for(woken.wait(), timeout=5)
        assert len(rings) == 1
        woken.clear()
        sender.sendto(b"!", name)
        await asyncio.wait_for(woken.wait(), timeout=5)
        assert len(rings) == 2
    finally:
        sender.close()
        doorbell.close()


async def test_ringing_with_nobody_listening_is_harmless(caplog: pytest.LogCaptureFixture) -> None:
    """With no doorbell yet, a ring raises nothing and logs nothing; once worker 0 listens, the
    same bell reaches it."""
    name = channel_name(os.getpid()) + "-nobody"
    bell = Bell(name)
    try:
        with caplog.at_level(logging.DEBUG):
            bell.ring()
            await asyncio.sleep(0)  # the send ran and found no listener
        assert caplog.records == []
        with _listening(name) as listener:
            bell.ring()
            await asyncio.sleep(0)
            assert _queued(listener) == 1
    finally:
        bell.close()
