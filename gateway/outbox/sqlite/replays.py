"""Replays made by another process on an outbox file, announced to the gateway that holds it.

Rule: ``waba-gateway deliveries replay`` writes to the file while its gateway runs, and that
gateway may hold the replayed delivery in memory, in a conversation's run behind the delivery
being sent (:class:`gateway.delivery.ordering.Runs`). The command then sends the delivery's id
(nothing, after a replay of many) in a datagram to a Unix socket in Linux's abstract namespace
named after the file itself (its device and inode: no file to clean up, the same name for
every process that opens that file, another for every other file), which the gateway holding
the file listens on. A hint, like :mod:`gateway.runtime.wake`'s: lost, or with no gateway
listening, the outcome of a send that started before the replay is still not recorded over it
(:func:`gateway.outbox.sqlite.store.record_attempts`), so the replay stands either way; heard, the
run lets go of the replayed delivery before it is sent in its old place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

__all__ = ["ReplayBell", "announce"]

log = logging.getLogger(__name__)

_MAX_DATAGRAM = 4096


def _name(path: Path) -> str:
    found = os.stat(path)
    return f"\0waba-gateway-replayed-{found.st_dev}-{found.st_ino}"


def announce(path: Path, delivery_id: str | None) -> None:
    """Tell the gateway holding ``path`` (if any) that ``delivery_id`` was replayed (``None``:
    pending deliveries, any of them). Never fails: the announcement is a hint."""
    with (
        contextlib.suppress(OSError),
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as bell,
    ):
        bell.setblocking(False)
        bell.sendto((delivery_id or "").encode(), _name(path))


class ReplayBell:
    """The gateway's side: calls ``on_replay`` for each announcement heard about ``path``."""

    def __init__(self, path: Path, on_replay: Callable[[str | None], None]) -> None:
        self._on_replay = on_replay
        self._loop = asyncio.get_running_loop()
        self._socket: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        try:
            self._socket.bind(_name(path))
        except OSError as exc:
            # Another process holding this file listens (a test's second outbox on it): replays
            # from outside are then only as good as the record's check.
            log.warning("outbox.path = '%s': cannot listen for replays: %s", path, exc)
            self._socket.close()
            self._socket = None
            return
        self._loop.add_reader(self._socket.fileno(), self._heard)

    def _heard(self) -> None:
        assert self._socket is not None
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while True:
                data = self._socket.recv(_MAX_DATAGRAM)
                self._on_replay(data.decode(errors="replace") or None)

    def close(self) -> None:
        if self._socket is not None:
            self._loop.remove_reader(self._socket.fileno())
            self._socket.close()
            self._socket = None
