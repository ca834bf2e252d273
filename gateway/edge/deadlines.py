"""Deadlines of many connections kept by one timer: the TLS handshakes and shutdowns under
way on one acceptor.

Rule: a connection whose deadline passes is told (``expired()``) once, on the loop, no sooner;
a deadline cleared is never told. Why one timer: a ``TimerHandle`` per connection is made,
pushed onto the loop's heap and cancelled for every new connection, almost always for nothing
(a handshake takes milliseconds, its timeout 30 s); here setting and clearing a deadline is a
dict entry, and the one timer runs only while some deadline is pending, at the earliest one.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

__all__ = ["Deadlines", "Expires"]

log = logging.getLogger(__name__)


class Expires(Protocol):
    """What has a deadline: told once it has passed."""

    def expired(self) -> None: ...


class Deadlines:
    """When each connection's handshake or shutdown must be over, kept by one timer that runs
    only while some deadline is pending and fires at the earliest of them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._due: dict[Expires, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def set(self, connection: Expires, seconds: float) -> None:
        at = self._loop.time() + seconds
        self._due[connection] = at
        if self._timer is None or at < self._timer_at:
            self._schedule(at)

    def clear(self, connection: Expires) -> None:
        self._due.pop(connection, None)

    def _schedule(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(at, self._expire)
        self._timer_at = at

    def _expire(self) -> None:
        self._timer = None
        now = self._loop.time()
        for connection in [c for c, at in self._due.items() if at <= now]:
            del self._due[connection]
            try:
                connection.expired()
            except Exception:
                # One connection's failure to end must not cost the others theirs: a raise
                # here would skip the rest of the pass and the next timer, and every pending
                # handshake would then wait without a deadline (a slow client's way to hold
                # connections open).
                log.exception("a connection past its deadline could not be ended")
        if self._due:
            self._schedule(min(self._due.values()))
