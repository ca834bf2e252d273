"""What the dispatcher removes from the outbox, once a minute: delivered deliveries past
``outbox.retention_s``, and dead letters past ``outbox.dead_retention_s`` when that is set.

Rule: pending deliveries are never removed here; dead letters only past a retention of their
own, and never silently: an operator who meant to replay them learns they are gone (a warning
line and the ``dead_letters_expired`` count).
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from gateway.delivery.reporting import Observer
from gateway.outbox import Outbox

__all__ = ["PRUNE_EVERY_S", "Retention"]

# The dispatcher's logger: its lines have always been named after it.
log = logging.getLogger("gateway.delivery.dispatcher")

PRUNE_EVERY_S = 60.0


class Retention:
    def __init__(
        self,
        outbox: Outbox,
        retention_s: float,
        dead_retention_s: float | None,
        observer: Observer,
    ) -> None:
        self._outbox = outbox
        self._retention_s = retention_s
        self._dead_retention_s = dead_retention_s
        self._observer = observer
        self._last = 0.0

    async def maybe_prune(self, now: float, targets: Collection[str]) -> None:
        """Prune old delivered rows and expire old dead letters, unless that was done less
        than :data:`PRUNE_EVERY_S` ago: the delivered rows of every target the outbox holds
        some of, ``targets`` (those configured) or not (one removed from the configuration
        keeps its pending deliveries, not its delivered ones past the retention)."""
        if now - self._last < PRUNE_EVERY_S:
            return
        self._last = now
        # The outbox's list alone: a configured target missing from it has no delivered row
        # to prune, and each target pruned is one more statement (on PostgreSQL, one that may
        # read every delivery: ten configured targets, one of them with delivered rows, among
        # two million deliveries, took 1.4 s a prune, not 0.2 s).
        every = await self._outbox.delivered_targets()
        removed = await self._outbox.prune(now, self._retention_s, every)
        if removed:
            log.info("pruned %d delivered rows past retention", removed)
        if self._dead_retention_s is None:
            return
        expired = await self._outbox.purge_dead(now - self._dead_retention_s, now)
        if expired:
            self._observer.dead_letters_expired(expired)
            log.warning(
                "removed %d dead letters older than outbox.dead_retention_s (%gs)",
                expired,
                self._dead_retention_s,
                extra={"action": "expire_dead_letters", "count": expired},
            )
