"""One target's place in the dispatcher: its lane.

Rule: everything the dispatcher keeps about one target lives in its :class:`Lane`, and changes
together. A lane is opened when its target is configured; a reload that changes the target renews
it in place (new settings, sender and retry policy; its health, budget and queue kept, since the
batches already out count against them); a reload that removes the target takes it out of the
dispatcher, and its batches on the wire finish against it. The decisions on a lane (how much a
claim may ask for, how large its next batch is, what its circuit reads) are plain arithmetic: no
I/O and no event loop. The sender a reload replaces, or takes out with its lane, is closed once
the batches that may be using it are done (:class:`Retired`).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Literal

from gateway.config import TargetConfig
from gateway.delivery.backoff import RetryPolicy, TargetHealth
from gateway.delivery.sending import Sender, sender_for
from gateway.outbox import Delivery

__all__ = ["BATCH_BYTES", "Circuit", "Lane", "Retired", "batch_size"]

# Bodies in one batch, at most (a batch is written in one call, so it is held in memory at once):
# 32 of Meta's largest notifications (3 MB) would otherwise be 96 MB. A single larger body still
# goes, alone.
BATCH_BYTES = 1024 * 1024

Circuit = Literal["closed", "open", "half_open"]


@dataclass(eq=False, slots=True, kw_only=True)
class Lane:
    """A target, what sends to it, how it is retried, its health, and its deliveries under way."""

    target: TargetConfig
    sender: Sender
    policy: RetryPolicy
    health: TargetHealth = field(default_factory=TargetHealth)
    # Deliveries started and not finished, queued or on the wire: the target's own budget
    # (dispatcher.batch_size), so that a target that never answers holds only its own back. (A
    # run of an ordered target holds one place, handed on at each answer: dispatcher._go_on.)
    load: int = 0
    # Deliveries in batches on the wire: at most the target's ``concurrency``.
    busy: int = 0
    # Deliveries answered whose place went back to the claims before their outcome is recorded
    # (each the end of a run: dispatcher._go_on): no longer in ``load``, and at most the budget.
    ahead: int = 0
    # Started, waiting for the target's next batch: it goes at the end of this turn of the
    # event loop, together with the others that came due in it, or once ``concurrency`` allows.
    queue: list[Delivery] = field(default_factory=list)

    @classmethod
    def open(cls, target: TargetConfig, tls: ssl.SSLContext | None = None) -> Lane:
        """A new lane for ``target``; ``tls``: the client context of a target with TLS files of
        its own (:func:`gateway.delivery.target_tls.target_contexts`)."""
        return cls(
            target=target, sender=sender_for(target, tls), policy=RetryPolicy.for_target(target)
        )

    def renew(self, target: TargetConfig, tls: ssl.SSLContext | None = None) -> Sender:
        """Take ``target``'s new settings with a new sender and retry policy; return the sender
        replaced, for the caller to close once the batches using it are done."""
        replaced = self.sender
        self.target, self.sender = target, sender_for(target, tls)
        self.policy = RetryPolicy.for_target(target)
        return replaced

    def reopen(self, target: TargetConfig, tls: ssl.SSLContext | None = None) -> None:
        """Configure a removed lane again, before the batches it still had out are done: they
        keep counting against its budget. Its health starts afresh; the sender it had when it
        was removed is being closed already."""
        self.renew(target, tls)
        self.health = TargetHealth()

    def room(self, now: float, capacity: int) -> int:
        """How many deliveries a claim may ask for: none while the target is paused or its
        budget of ``capacity`` is used up, one while it is probed, else what is left of it."""
        if self.load >= capacity or not self.health.admits(now, self.busy):
            return 0
        return 1 if self.health.probing else capacity - self.load

    def push(self, delivery: Delivery) -> None:
        """Start ``delivery``: it counts against the budget from now until its batch is done."""
        self.load += 1
        self.queue.append(delivery)

    def next_batch(self) -> list[Delivery]:
        """Take the next batch off the queue and count it as on the wire: at most ``pipeline``
        deliveries, what ``concurrency`` leaves room for, and :data:`BATCH_BYTES` of bodies.
        Empty when nothing is queued or no room is left."""
        room = self.target.concurrency - self.busy
        if not self.queue or room <= 0:
            return []
        size = batch_size(self.queue, min(self.target.pipeline, room))
        batch = self.queue[:size]
        del self.queue[:size]
        self.busy += size
        return batch

    def circuit(self, now: float) -> Circuit:
        """Closed (healthy), open (paused after failures) or half-open (probing with one)."""
        if not self.health.probing:
            return "closed"
        return "open" if now < self.health.paused_until else "half_open"


def batch_size(queue: Sequence[Delivery], most: int) -> int:
    """How many of ``queue``'s first deliveries make the next batch: at most ``most``, and no
    more than :data:`BATCH_BYTES` of bodies unless the first alone is larger."""
    size = total = 0
    for delivery in queue[:most]:
        total += len(delivery.body)
        if size and total > BATCH_BYTES:
            break
        size += 1
    return size


class Retired:
    """Senders a reload replaced or took out, each closed once the batches on the wire when it
    was retired (which may be using it) are done."""

    def __init__(self) -> None:
        self._senders: list[Sender] = []
        self._closing: set[asyncio.Task[None]] = set()

    def add(self, sender: Sender, batches: Collection[asyncio.Task[None]]) -> None:
        waiting = list(batches)
        self._senders.append(sender)

        async def close() -> None:
            if waiting:  # wait(), not gather(): cancelling this must not cancel the batches
                await asyncio.wait(waiting)
            await sender.close()
            self._senders.remove(sender)

        task = asyncio.create_task(close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Close every retired sender now, without waiting further (the dispatcher stops)."""
        for closing in list(self._closing):
            closing.cancel()
        await asyncio.gather(*self._closing, return_exceptions=True)
        for sender in list(self._senders):
            await sender.close()
