"""Wake-ups across hosts: LISTEN on the outbox's channel, on a connection of its own.

Rule: a gateway that stores deliveries no lease holds (a replay, a worker that does not
dispatch) announces them with ``NOTIFY`` in the same transaction, and every dispatcher listening
is woken at once instead of at its next poll. When the connection is lost (the database
restarts) the listener connects again with a growing pause, and wakes its dispatcher once it is
back, for whatever was announced meanwhile: a missed wake-up only delays, since dispatchers
poll too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import asyncpg

from gateway.outbox.postgres.committer import FAILURES
from gateway.outbox.postgres.sql import CHANNEL, REPLAYED

__all__ = ["Listener"]

log = logging.getLogger(__name__)

_PAUSE_FIRST_S = 0.2
_PAUSE_MAX_S = 5.0


class Listener:
    """Calls ``on_wake`` for each notification on :data:`CHANNEL`, until closed, and first
    ``on_replay`` with what follows :data:`REPLAYED` in one that announces a replay ("":
    pending deliveries, any of them; so too once connected again, for what was missed)."""

    def __init__(
        self,
        connect: Callable[[], Any],
        on_wake: Callable[[], None],
        *,
        timeout_s: float,
        on_replay: Callable[[str], None] | None = None,
    ) -> None:
        self._connect = connect
        self._on_wake = on_wake
        self._on_replay = on_replay
        self._timeout_s = timeout_s
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._conn: asyncpg.Connection[Any] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outbox-listener")

    def _heard(self, _conn: object, _pid: object, _channel: object, payload: object) -> None:
        replay = self._on_replay
        if replay is not None and isinstance(payload, str) and payload.startswith(REPLAYED):
            replay(payload[len(REPLAYED) :])
        self._on_wake()

    def _terminated(self, *_: object) -> None:
        self._lost.set()

    async def _run(self) -> None:
        pause = _PAUSE_FIRST_S
        first = True
        while True:
            try:
                conn = await asyncio.wait_for(self._connect(), self._timeout_s)
                await conn.add_listener(CHANNEL, self._heard)
            except FAILURES as exc:
                log.warning("outbox listener cannot connect (%s); again in %.1fs", exc, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, _PAUSE_MAX_S)
                continue
            self._conn = conn
            self._lost.clear()
            conn.add_termination_listener(self._terminated)
            if not first:
                log.info("outbox listener connected again")
                if self._on_replay is not None:
                    self._on_replay("")
                self._on_wake()
            first, pause = False, _PAUSE_FIRST_S
            await self._lost.wait()
            self._conn = None
            with contextlib.suppress(*FAILURES):
                await conn.close(timeout=1.0)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._conn is not None:
            with contextlib.suppress(*FAILURES):
                await self._conn.close(timeout=1.0)
            self._conn = None
