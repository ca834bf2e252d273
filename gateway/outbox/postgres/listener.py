"""Wake-ups across hosts: LISTEN on the outbox's channel, on a connection of its own.

Rule: a gateway that stores deliveries no lease holds (a replay, a worker that does not
dispatch) announces them with ``NOTIFY`` in the same transaction, and every dispatcher listening
is woken at once instead of at its next poll. When the connection is lost (the database
restarts) the listener connects again with a growing pause, and wakes its dispatcher once it is
back, for whatever was announced meanwhile: a missed wake-up only delays, since dispatchers
poll too. So too when its first tries fail (the database full or restarting as the gateway
starts): the outbox is open by then, and other gateways announce to it.

A connection lost without a word (a NAT or firewall that forgot it after an idle timeout, a
failover that sent no reset, a server that hangs) would never be noticed by a listener that only
waits: no packet ever comes to say so, and every later announcement would go unheard until the
gateway restarts. So the listener asks its connection a trivial question every
:data:`CHECK_S` seconds (which also keeps such a path from ever going idle); no answer within
the timeout counts as the connection lost, and it connects again. TCP keepalive would cover a
forgotten path only (not a server that hangs) and not a connection over a Unix socket.

Between two checks the connection is idle, and a server that ends idle sessions
(``idle_session_timeout``, set for the server, the database or the role) shorter than that would
end the listener's at every pause: each time it connects again and wakes its dispatcher for what
it may have missed, which makes the dispatcher drop its runs. Its own session is exempt, as
:data:`_SESSION` says.
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
# Between two checks of an idle connection: well inside the idle timeouts of NATs and firewalls
# (minutes), and a round trip a gateway never feels.
CHECK_S = 30.0
# Run on each new connection before it listens: the listener's own session is never ended for
# being idle (0 disables idle_session_timeout for this session alone:
# https://www.postgresql.org/docs/15/runtime-config-client.html#GUC-IDLE-SESSION-TIMEOUT). A
# session that LISTENs is idle by design: it waits for notifications, which the server sends it
# while it is idle, and is asked only a trivial question every check. Read from pg_settings, so
# that a server older than PostgreSQL 14, which has no such setting (nor ends idle sessions),
# sets nothing rather than refusing an unknown name. idle_in_transaction_session_timeout needs
# no such care: it ends only a session idle inside an open transaction, and the listener never
# opens one (LISTEN and its checks each commit on their own).
_SESSION = (
    "SELECT set_config(name, '0', false) FROM pg_settings WHERE name = 'idle_session_timeout'"
)


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
        check_s: float = CHECK_S,
    ) -> None:
        self._connect = connect
        self._on_wake = on_wake
        self._on_replay = on_replay
        self._timeout_s = timeout_s
        self._check_s = check_s
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
        # Whether announcements may have gone unheard: a connection was lost, or the first
        # tries failed (the outbox was already open, and other gateways announcing, meanwhile).
        missed = False
        while True:
            try:
                conn = await asyncio.wait_for(self._connect(), self._timeout_s)
            except FAILURES as exc:
                log.warning("outbox listener cannot connect (%s); again in %.1fs", exc, pause)
                missed = True
                await asyncio.sleep(pause)
                pause = min(pause * 2, _PAUSE_MAX_S)
                continue
            # Held from here, so that close() ends it whatever step is cancelled.
            self._conn = conn
            try:
                await asyncio.wait_for(conn.execute(_SESSION), self._timeout_s)
                await asyncio.wait_for(conn.add_listener(CHANNEL, self._heard), self._timeout_s)
            except FAILURES as exc:
                # The connection opened: closed here, or each attempt would leave one behind,
                # a server session each, until the server refuses every connection.
                log.warning("outbox listener cannot listen (%s); again in %.1fs", exc, pause)
                missed = True
                self._conn = None
                await _close(conn)
                await asyncio.sleep(pause)
                pause = min(pause * 2, _PAUSE_MAX_S)
                continue
            self._lost.clear()
            conn.add_termination_listener(self._terminated)
            if missed:
                log.info("outbox listener listening; the dispatcher looks for what it missed")
                if self._on_replay is not None:
                    self._on_replay("")
                self._on_wake()
            pause = _PAUSE_FIRST_S
            await self._watch(conn)
            missed = True
            self._conn = None
            await _close(conn)

    async def _watch(self, conn: asyncpg.Connection[Any]) -> None:
        """Return once ``conn`` is lost: ended (the driver says so), or silent, when a trivial
        query every ``check_s`` seconds gets no answer within the timeout."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), self._check_s)
                return
            try:
                await conn.fetchval("SELECT 1", timeout=self._timeout_s)
            except FAILURES as exc:
                reason = str(exc) or type(exc).__name__
                log.warning("outbox listener lost its connection (%s); connecting again", reason)
                # Ended at once: a connection that does not answer would not answer a goodbye.
                conn.terminate()
                return

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._conn is not None:
            await _close(self._conn)
            self._conn = None


async def _close(conn: asyncpg.Connection[Any]) -> None:
    with contextlib.suppress(*FAILURES):
        await conn.close(timeout=1.0)
