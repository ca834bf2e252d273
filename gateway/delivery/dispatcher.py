"""The dispatcher: takes due deliveries out of the outbox and forwards them, never in the
request path.

Rule: a delivery leaves the ``pending`` state only through :meth:`Outbox.record_many` after an
attempt has finished, so a crash at any point means it is sent again (at-least-once); targets
deduplicate on ``X-Gateway-Delivery-Id``. Time and randomness are injected so tests never sleep on
backoff.

Deliveries started in one turn of the event loop (the notifications of one group commit, or a
claim from the outbox) go to each target in batches: one batch is one exchange through the
target's sender (:mod:`gateway.delivery.sending`, which alone knows the target's kind: pipelined
HTTP requests on one connection, one Redis pipeline, concurrent JetStream publishes), at most the
target's ``pipeline`` deliveries and :data:`BATCH_BYTES` of bodies, with at most ``concurrency``
deliveries in flight per target. Its outcomes are recorded as one outbox job, and the target's
health takes one verdict per batch.

Targets can change while it runs (:meth:`Dispatcher.reconfigure`, on a reload): attempts in flight
finish with the settings they started with; the deliveries of a target no longer configured stay
pending in the outbox, listed and replayable, and go out again if the target comes back.

Targets are isolated: each has its own budget of started deliveries (``dispatcher.batch_size``),
so a target that never answers holds only its own deliveries back, never another target's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

from gateway.config import DispatcherConfig, TargetConfig
from gateway.delivery.backoff import Breaker, RetryPolicy, TargetHealth
from gateway.delivery.outcome import (
    AttemptResult,
    DeadLetter,
    Delivered,
    Outcome,
    RetryAt,
    classify,
    is_transient,
)
from gateway.delivery.pacing import Pacing
from gateway.delivery.sending import Sender, sender_for
from gateway.errors import OutboxError
from gateway.outbox import Delivery, Outbox

if TYPE_CHECKING:
    # Annotations only: with tracing off no OpenTelemetry module is imported at all.
    from gateway.tracing import Tracing

__all__ = ["BATCH_BYTES", "Circuit", "Dispatcher", "Observer"]

log = logging.getLogger(__name__)

_PRUNE_EVERY_S = 60.0
# An attempt's outcome as its span names it: the words its log line uses.
_OUTCOMES: dict[type, str] = {Delivered: "delivered", RetryAt: "retry", DeadLetter: "dead"}
# Bodies in one batch, at most (a batch is written in one call, so it is held in memory at once):
# 32 of Meta's largest notifications (3 MB) would otherwise be 96 MB. A single larger body still
# goes, alone.
BATCH_BYTES = 1024 * 1024

Circuit = Literal["closed", "open", "half_open"]


class Observer(Protocol):
    """What the dispatcher reports (the runtime's metrics provide it)."""

    def attempted(self, target: str, outcome: str, latency_s: float | None) -> None:
        """One attempt's ``outcome`` (delivered, retry, dead); ``latency_s``: from the
        delivery's acknowledgement to its delivery, for a delivered one."""
        ...

    def dead_letters_expired(self, count: int) -> None:
        """``count`` dead letters removed for being older than ``outbox.dead_retention_s``."""
        ...


class _Ignore:
    def attempted(self, target: str, outcome: str, latency_s: float | None) -> None:
        pass

    def dead_letters_expired(self, count: int) -> None:
        pass


class Dispatcher:
    def __init__(
        self,
        outbox: Outbox,
        targets: Sequence[TargetConfig],
        settings: DispatcherConfig,
        *,
        retention_s: float,
        dead_retention_s: float | None = None,
        clock: Callable[[], float] = time.time,
        uniform: Callable[[float, float], float] = random.uniform,
        observer: Observer | None = None,
        tls: Mapping[str, ssl.SSLContext] | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        """``tls``: the client contexts of targets with a CA or certificate of their own
        (:func:`gateway.delivery.target_tls.target_contexts`); the others use the defaults.
        ``tracing``: one CLIENT span per attempt when [tracing] is enabled."""
        tls = tls or {}
        self._tracing = tracing
        self._outbox = outbox
        self._settings = settings
        self._retention_s = retention_s
        self._dead_retention_s = dead_retention_s
        self._clock = clock
        self._uniform = uniform
        self._observer = observer or _Ignore()
        self._targets = {t.name: t for t in targets}
        self._policies = {t.name: RetryPolicy.for_target(t) for t in targets}
        self._senders = {t.name: sender_for(t, tls.get(t.name)) for t in targets}
        self._health = {t.name: TargetHealth() for t in targets}
        # Conversation order and rate limits (gateway.delivery.pacing): their targets' deliveries
        # start only through claims.
        self._pacing = Pacing(targets, clock())
        self._busy = dict.fromkeys(self._targets, 0)  # attempts in flight per target
        self._retired: list[Sender] = []  # replaced by a reload, closed after their batches
        self._closing: set[asyncio.Task[None]] = set()
        # Attempts started or queued, per target: one budget for all would let a target that
        # never answers fill it, and every other target would wait for its timeout.
        self._capacity = max(settings.batch_size, 1)
        self._load = dict.fromkeys(self._targets, 0)
        # True when the outbox may hold due deliveries the last claim had no room for: only
        # then does a finished attempt wake the loop. Otherwise the outbox is read on the poll
        # interval, and fresh notifications arrive through offer() without being read back.
        self._backlog = True
        # Started deliveries: in a batch on the wire, or queued for the target's next batch
        # (the target's ``concurrency`` is reached, or the batch goes out at the end of this
        # turn of the event loop, together with the others that came due in it).
        self._in_flight: set[str] = set()
        self._queued: dict[str, list[Delivery]] = {name: [] for name in self._targets}
        self._send_scheduled = False
        self._batches: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._last_prune = 0.0
        self._warming: list[asyncio.Task[None]] = []

    def wake(self) -> None:
        """Look for due deliveries now (called after a notification was stored by another
        process, or a replay): in every conversation of the ordered targets too."""
        self._pacing.conversations.everything()
        self._wake.set()

    def breakers(self) -> dict[str, Breaker]:
        """Each target's circuit breaker as it stands now (a copy: for the admin console)."""
        now = self._clock()
        return {name: health.breaker(now) for name, health in self._health.items()}

    def offer(self, deliveries: Sequence[Delivery]) -> None:
        """Start deliveries that were just stored, without reading them back from the outbox.
        Whatever cannot start now stays pending in the outbox: for want of room, the loop is
        woken to claim it as attempts finish; for a paused or probing target, the target's
        probes reach it on the poll interval."""
        claim_only = self._pacing.claim_only
        for delivery in deliveries:
            health = self._health.get(delivery.target)
            if delivery.target in claim_only and not (
                # First of its conversation when it was accepted, so still (see Delivery).
                delivery.target in self._pacing.unpaced_ordered
                and delivery.order_key is not None
                and not delivery.behind
            ):
                # Paced, or behind another: only a claim knows when it may start.
                self._pacing.conversations.held(delivery.target, delivery.order_key, delivery.id)
                self._wake.set()
                continue
            if delivery.id in self._in_flight or health is None or health.probing:
                # A failing target gets them through its probes, on the poll interval: waking
                # the loop for every notification would only query a target that cannot take
                # them.
                self._pacing.conversations.held(delivery.target, delivery.order_key, delivery.id)
                continue
            if self._load[delivery.target] >= self._capacity:
                self._pacing.conversations.held(delivery.target, delivery.order_key, delivery.id)
                self._backlog = True
                self._wake.set()
                continue
            self._start(delivery)

    def reconfigure(
        self,
        targets: Sequence[TargetConfig],
        settings: DispatcherConfig,
        tls: Mapping[str, ssl.SSLContext] | None = None,
    ) -> None:
        """Take new targets and settings (a reload). A target whose settings are unchanged keeps
        its connections and health; a changed one gets a new sender, the old one finishing
        its batches in flight, and so does one with TLS files of its own (``tls``), read again
        by this reload whether their names changed or not. Deliveries queued for a removed
        target are let go: they stay pending in the outbox."""
        tls = tls or {}
        self._settings = settings
        self._capacity = max(settings.batch_size, 1)
        self._pacing.reconfigure(targets, self._clock())
        new = {t.name: t for t in targets}
        for name in list(self._targets):
            if name not in new:
                self._forget(name)
        for name, target in new.items():
            if self._targets.get(name) == target and name not in tls:
                continue
            old = self._senders.get(name)
            if old is not None:
                self._retire(old)
            self._targets[name] = target
            self._policies[name] = RetryPolicy.for_target(target)
            self._senders[name] = sender_for(target, tls.get(name))
            self._health.setdefault(name, TargetHealth())
            self._busy.setdefault(name, 0)
            self._load.setdefault(name, 0)
            self._queued.setdefault(name, [])
        self._backlog = True
        self._wake.set()

    def _forget(self, name: str) -> None:
        # Its load entry stays: batches still out for it finish and give their budget back.
        for delivery in self._queued.pop(name, []):
            self._in_flight.discard(delivery.id)
            self._load[name] -= 1
        self._retire(self._senders.pop(name))
        del self._targets[name], self._policies[name], self._health[name]

    def _retire(self, sender: Sender) -> None:
        """Close a replaced sender's connections once the batches now on the wire, which
        may be using it, are done."""
        self._retired.append(sender)
        batches = list(self._batches)

        async def close() -> None:
            if batches:  # wait(), not gather(): cancelling this must not cancel the batches
                await asyncio.wait(batches)
            await sender.close()
            self._retired.remove(sender)

        task = asyncio.create_task(close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def circuits(self, now: float) -> dict[str, Circuit]:
        """Each target's circuit breaker: closed (healthy), open (paused after failures) or
        half-open (probing with one delivery)."""
        return {
            name: "closed"
            if not health.probing
            else ("open" if now < health.paused_until else "half_open")
            for name, health in self._health.items()
        }

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="dispatcher")
        # Open one connection to each target ahead of the first notification, so the first
        # forward does not pay for the connection set-up; a target that is down is no error.
        self._warming = [asyncio.create_task(sender.warm()) for sender in self._senders.values()]

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop claiming, let attempts in flight finish for up to ``grace_s``, cancel the rest
        (they stay pending in the outbox and are sent again on the next start)."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
        for warming in self._warming:
            warming.cancel()
        await asyncio.gather(*self._warming, return_exceptions=True)
        for queue in self._queued.values():
            queue.clear()  # not sent: they stay pending in the outbox
        if self._batches:
            _, late = await asyncio.wait(list(self._batches), timeout=grace_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        for closing in list(self._closing):
            closing.cancel()
        await asyncio.gather(*self._closing, return_exceptions=True)
        for sender in [*self._senders.values(), *self._retired]:
            await sender.close()

    async def _loop(self) -> None:
        failing: str | None = None  # the outbox's complaint, logged once until it recovers
        while not self._stopping:
            self._wake.clear()
            try:
                await self._claim()
                await self._maybe_prune()
            except OutboxError as exc:  # locked, lost, full: said once, tried on every poll
                if str(exc) != failing:
                    failing = str(exc)
                    log.error("dispatcher cannot use the outbox (retrying): %s", exc)
            except Exception:  # anything else: log, wait, try again; never die silently
                log.exception("dispatcher cycle failed; retrying")
            else:
                if failing is not None:
                    failing = None
                    log.info("dispatcher uses the outbox again")
            wait = self._pacing.wait_s(self._clock(), self._settings.poll_interval_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def _claim(self) -> None:
        now = self._clock()
        # A paused target is not asked at all; a probing one for a single delivery; a target
        # whose budget is used up waits for its own attempts to finish.
        limits = {
            name: 1 if health.probing else self._capacity - self._load.get(name, 0)
            for name, health in self._health.items()
            if health.admits(now, self._busy.get(name, 0))
            and self._load.get(name, 0) < self._capacity
        }
        wanted = limits
        claim = await self._pacing.plan(self._outbox, limits, now)
        limits = claim.limits
        if not limits:
            return
        due = await self._outbox.due(
            now,
            limits,
            exclude=self._in_flight,
            ordered=self._pacing.ordered,
            conversations=claim.conversations,
        )
        took_s = self._clock() - now
        claimed = dict.fromkeys(limits, 0)
        started = []
        for delivery in due:
            claimed[delivery.target] += 1
            room = self._load[delivery.target] < self._capacity
            if room and delivery.id not in self._in_flight:  # else offered while the query ran
                self._start(delivery)
                started.append(delivery)
        await self._pacing.settle(self._outbox, claim, claimed, started, took_s)
        self._backlog = any(claimed[name] >= wanted[name] for name in limits)

    def _start(self, delivery: Delivery) -> None:
        self._in_flight.add(delivery.id)
        self._load[delivery.target] += 1
        self._queued[delivery.target].append(delivery)
        self._schedule_send()

    def _schedule_send(self) -> None:
        """Send what is queued at the end of this turn of the event loop (once per turn)."""
        if not self._send_scheduled:
            self._send_scheduled = True
            asyncio.get_running_loop().call_soon(self._send_queued)

    def _send_queued(self) -> None:
        """Start a batch for each target with queued deliveries, within its concurrency."""
        self._send_scheduled = False
        if self._stopping:
            return
        for name, queue in self._queued.items():
            target = self._targets[name]  # a removed target's queue is removed with it
            while queue and self._busy[name] < target.concurrency:
                size = _batch_size(
                    queue, min(target.pipeline, target.concurrency - self._busy[name])
                )
                batch = queue[:size]
                del queue[:size]
                self._busy[name] += size
                task = asyncio.create_task(self._attempt(name, batch))
                self._batches.add(task)
                task.add_done_callback(functools.partial(self._done, batch))

    def _done(self, batch: list[Delivery], task: asyncio.Task[None]) -> None:
        self._batches.discard(task)
        for delivery in batch:
            self._in_flight.discard(delivery.id)
            self._load[delivery.target] -= 1
        if self._backlog or batch[0].target in self._pacing.ordered:
            # An ordered target's next delivery of each conversation waits for this outcome.
            self._wake.set()

    async def _attempt(self, name: str, batch: list[Delivery]) -> None:
        attempts = [delivery.attempts + 1 for delivery in batch]
        # Taken now: a reload may replace or remove the target while the batch is out.
        sender, health, policy = self._senders[name], self._health[name], self._policies[name]
        spans = (
            None
            if self._tracing is None
            else self._tracing.attempt_spans(
                sender.target.url,
                name,
                [(d.id, d.trace, attempt) for d, attempt in zip(batch, attempts, strict=True)],
                sender.target.kind,
            )
        )
        try:
            try:
                results = await sender.send_many(
                    batch, attempts, None if spans is None else [headers for _, headers in spans]
                )
            except Exception as exc:
                # Still failed attempts: recorded and backed off like any other, rather than a
                # dead task whose deliveries are claimed again at once, in a tight loop.
                log.exception("attempts of %d deliveries to %s failed", len(batch), name)
                results = [AttemptResult(error=f"{type(exc).__name__}: {exc}"[:300])] * len(batch)
        except BaseException:
            # Stopped mid-batch: the attempts stay pending; their spans say so.
            if spans is not None and self._tracing is not None:
                for span, _ in spans:
                    self._tracing.end_attempt(span, None, "stopped", "retry")
            raise
        finally:
            self._busy[name] -= len(batch)
            if self._queued.get(name):
                self._schedule_send()
        now = self._clock()
        # One verdict on the target per batch: a batch is one exchange with it, and a target
        # that is down fails every request in it at once.
        if any(is_transient(result) for result in results):
            health.failed(now, policy, self._uniform)
        elif health.probing:
            log.info("target %s answers again", name)
            health.succeeded()
        outcomes = [
            classify(
                result,
                attempt=attempt,
                created_at=delivery.created_at,
                now=now,
                policy=policy,
                uniform=self._uniform,
            )
            for delivery, attempt, result in zip(batch, attempts, results, strict=True)
        ]
        if spans is not None and self._tracing is not None:
            for (span, _), outcome, result in zip(spans, outcomes, results, strict=True):
                self._tracing.end_attempt(
                    span, result.status, result.error, _OUTCOMES[type(outcome)]
                )
        try:
            await self._outbox.record_many(
                [
                    (delivery.id, outcome, result)
                    for delivery, outcome, result in zip(batch, outcomes, results, strict=True)
                ],
                now,
            )
        except Exception:
            # Not recorded: they stay pending and are sent again later (at-least-once).
            log.exception("could not record %d deliveries to %s", len(batch), name)
            self._pacing.conversations.changed(name, None)
            return
        if name in self._pacing.ordered:
            self._announce(name, batch, outcomes)
        debugging = log.isEnabledFor(logging.DEBUG)
        for delivery, attempt, outcome, result in zip(
            batch, attempts, outcomes, results, strict=True
        ):
            if isinstance(outcome, Delivered):
                latency = max(0.0, now - delivery.created_at)
                self._observer.attempted(name, "delivered", latency)
                if debugging:  # the usual outcome: no fields built for a line not written
                    log.debug(
                        "delivered %s to %s",
                        delivery.id,
                        name,
                        extra=_fields(delivery, name, attempt, result) | {"outcome": "delivered"},
                    )
                continue
            fields = _fields(delivery, name, attempt, result)
            if isinstance(outcome, RetryAt):
                self._observer.attempted(name, "retry", None)
                log.info(
                    "delivery %s to %s failed (%s); attempt %d, next in %.1fs",
                    delivery.id,
                    name,
                    outcome.reason,
                    attempt,
                    outcome.at - now,
                    extra=fields | {"outcome": "retry", "reason": outcome.reason},
                )
            elif isinstance(outcome, DeadLetter):
                self._observer.attempted(name, "dead", None)
                log.warning(
                    "delivery %s to %s dead-lettered: %s",
                    delivery.id,
                    name,
                    outcome.reason,
                    extra=fields | {"outcome": "dead", "reason": outcome.reason},
                )

    def _announce(self, name: str, batch: Sequence[Delivery], outcomes: Sequence[Outcome]) -> None:
        """The next delivery of each conversation may go now (if one is known to wait), or
        once this retry is due."""
        conversations = self._pacing.conversations
        for delivery, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, RetryAt):
                conversations.retry_at(name, delivery.order_key, outcome.at)
            else:
                conversations.finished(name, delivery.order_key)

    async def _maybe_prune(self) -> None:
        now = self._clock()
        if now - self._last_prune < _PRUNE_EVERY_S:
            return
        self._last_prune = now
        removed = await self._outbox.prune(now, self._retention_s, self._targets)
        if removed:
            log.info("pruned %d delivered rows past retention", removed)
        if self._dead_retention_s is not None:
            # Never silently: an operator who meant to replay them learns they are gone.
            expired = await self._outbox.purge_dead(now - self._dead_retention_s)
            if expired:
                self._observer.dead_letters_expired(expired)
                log.warning(
                    "removed %d dead letters older than outbox.dead_retention_s (%gs)",
                    expired,
                    self._dead_retention_s,
                    extra={"action": "expire_dead_letters", "count": expired},
                )


def _fields(delivery: Delivery, target: str, attempt: int, result: AttemptResult) -> dict[str, Any]:
    """The structured fields of an attempt's log line."""
    return {
        "delivery_id": delivery.id,
        "target": target,
        "attempt": attempt,
        "status": result.status,
    }


def _batch_size(queue: Sequence[Delivery], most: int) -> int:
    """How many of ``queue``'s first deliveries make the next batch: at most ``most``, and no
    more than :data:`BATCH_BYTES` of bodies unless the first alone is larger."""
    size = total = 0
    for delivery in queue[:most]:
        total += len(delivery.body)
        if size and total > BATCH_BYTES:
            break
        size += 1
    return size
