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
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING

from gateway.config import DispatcherConfig, TargetConfig
from gateway.delivery.backoff import Breaker, TargetHealth
from gateway.delivery.exchange import Exchange
from gateway.delivery.lanes import BATCH_BYTES, Circuit, Lane, Retired
from gateway.delivery.outcome import Outcome, RetryAt
from gateway.delivery.pacing import Pacing
from gateway.delivery.reporting import IGNORE, Observer, report
from gateway.delivery.retention import Retention
from gateway.errors import OutboxError
from gateway.outbox import Delivery, KeepsLeases, LinesUp, Outbox

if TYPE_CHECKING:
    # Annotations only: with tracing off no OpenTelemetry module is imported at all.
    from gateway.tracing import Tracing

__all__ = ["BATCH_BYTES", "Circuit", "Dispatcher", "Observer"]

log = logging.getLogger(__name__)


def _replayed(delivery_id: str, replays: Collection[str | None]) -> bool:
    """Whether ``delivery_id`` is among the ``replays`` heard while a read was out (``None``
    among them: every pending delivery was replayed)."""
    return delivery_id in replays or None in replays


def _before_replays(
    due: Sequence[Delivery], replays: Collection[str | None], ordered: Collection[str]
) -> list[Delivery]:
    """A claim's answer ``due`` without the conversations, of ``ordered`` targets, that hold a
    delivery replayed while the claim read them (``replays``, see :func:`_replayed`): the
    answer has it at its old place, ahead of deliveries the replay put before it. The replay's
    wake-up makes the next claim look at every conversation, in its new order; nothing of
    those conversations starts before that."""
    stale = {
        (delivery.target, delivery.order_key)
        for delivery in due
        if delivery.target in ordered
        and delivery.order_key is not None
        and _replayed(delivery.id, replays)
    }
    if not stale:
        return list(due)
    return [delivery for delivery in due if (delivery.target, delivery.order_key) not in stale]


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
        self._clock = clock
        self._uniform = uniform
        self._observer = observer or IGNORE
        self._retention = Retention(outbox, retention_s, dead_retention_s, self._observer)
        self._lanes = {t.name: Lane.open(t, tls.get(t.name)) for t in targets}
        # Removed by a reload while batches were still out for them: taken back, with what
        # those batches hold of the budget, if the target is configured again before they end.
        self._leaving: dict[str, Lane] = {}
        # Conversation order and rate limits (gateway.delivery.pacing): their targets' deliveries
        # start only through claims.
        self._pacing = Pacing(
            targets, clock(), lined_up=isinstance(outbox, LinesUp) and outbox.lines_up()
        )
        self._retired = Retired()
        # Each lane's budget of started deliveries: one budget for all would let a target that
        # never answers fill it, and every other target would wait for its timeout.
        self._capacity = max(settings.batch_size, 1)
        # True when the outbox may hold due deliveries the last claim had no room for: only
        # then does a finished attempt wake the loop. Otherwise the outbox is read on the poll
        # interval, and fresh notifications arrive through offer() without being read back.
        self._backlog = True
        # Every lane's started deliveries, on the wire or queued: what a claim must not return.
        self._in_flight: set[str] = set()
        # Deliveries whose outcome was recorded while a claim's query ran: its answer may still
        # call them due (read before the record committed), and must not start them again.
        self._recorded: set[str] | None = None
        # Deliveries replayed while a claim or a read of what follows runs was out (None: no
        # such read out; a None in it: every pending delivery): its answer still holds them at
        # their old places in their conversations (see _before_replays).
        self._replays: set[str | None] | None = None
        # Deliveries whose place in their lane's budget went, at their answer and before their
        # outcome was recorded (_go_on), to the next of their run (False) or back to the claims
        # when their run ended (True: counted in the lane's ``ahead``): their batch gives back
        # the rest. Until recorded they stay in flight.
        self._handed: dict[str, bool] = {}
        self._send_scheduled = False
        self._batches: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._warming: list[asyncio.Task[None]] = []
        # A shared outbox leases this gateway's deliveries to it while it lives: told which
        # targets it still sends to, it lets go of the rest (a target a reload removed here
        # may be another gateway's still, and would otherwise never reach it).
        self._leases = outbox if isinstance(outbox, KeepsLeases) else None
        self._keep_leases()

    def wake(self) -> None:
        """Look for due deliveries now (called after a notification was stored by another
        process, or a replay): in every conversation of the ordered targets too."""
        self._pacing.conversations.everything()
        self._wake.set()

    def replayed(self, delivery_id: str | None) -> None:
        """An operator replayed ``delivery_id`` (``None``: pending deliveries, any of them),
        here or elsewhere (the outbox hears of other processes' replays), which puts it at the
        back of its conversation: a run that holds it in memory, waiting behind the delivery
        ahead, lets go of the rest of itself, so that the outbox orders those deliveries
        again, the replayed one behind the others. One already started goes on: it is sent,
        or being sent, where it was, and its outcome is not recorded over the replay, so it
        goes again at the back (see ``_attempt``)."""
        self._pacing.runs.release(None if delivery_id is None else {delivery_id})
        if self._replays is not None:
            self._replays.add(delivery_id)
        self.wake()

    def breakers(self) -> dict[str, Breaker]:
        """Each target's circuit breaker as it stands now (a copy: for the admin console)."""
        now = self._clock()
        return {name: lane.health.breaker(now) for name, lane in self._lanes.items()}

    def offer(self, deliveries: Sequence[Delivery]) -> None:
        """Start deliveries that were just stored, without reading them back from the outbox.
        Whatever cannot start now stays pending in the outbox: for want of room, the loop is
        woken to claim it as attempts finish; for a paused or probing target, the target's
        probes reach it on the poll interval."""
        claim_only = self._pacing.claim_only
        for delivery in deliveries:
            lane = self._lanes.get(delivery.target)
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
            if delivery.id in self._in_flight or lane is None or lane.health.probing:
                # A failing target gets them through its probes, on the poll interval: waking
                # the loop for every notification would only query a target that cannot take
                # them.
                self._pacing.conversations.held(delivery.target, delivery.order_key, delivery.id)
                continue
            if lane.load >= self._capacity:
                self._pacing.conversations.held(delivery.target, delivery.order_key, delivery.id)
                self._backlog = True
                self._wake.set()
                continue
            self._start(lane, delivery)

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
        for name in [name for name in self._lanes if name not in new]:
            self._forget(name)
        for name, target in new.items():
            lane = self._lanes.get(name)
            if lane is None and name in self._leaving:  # back before its old batches ended
                self._lanes[name] = self._leaving.pop(name)
                self._lanes[name].reopen(target, tls.get(name))
            elif lane is None:
                self._lanes[name] = Lane.open(target, tls.get(name))
            elif lane.target != target or name in tls:
                self._retired.add(lane.renew(target, tls.get(name)), self._batches)
        self._keep_leases()
        self._backlog = True
        self._wake.set()

    def _keep_leases(self) -> None:
        """Tell a shared outbox the targets whose leases to keep: those configured, and those
        removed with batches still out (a lease let go meanwhile would let another gateway send
        what this one is sending). The leases on a removed target's other deliveries (queued
        and dropped by _forget, or leased here when they were accepted and never started) go
        once its last batch has ended."""
        if self._leases is not None:
            self._leases.keep_leases({*self._lanes, *self._leaving})

    def _forget(self, name: str) -> None:
        lane = self._lanes.pop(name)
        for delivery in lane.queue:
            self._in_flight.discard(delivery.id)
        lane.load -= len(lane.queue)
        lane.queue.clear()
        self._retired.add(lane.sender, self._batches)
        if lane.load:  # batches still out for it finish and give their budget back
            self._leaving[name] = lane

    def rate_limited(self) -> dict[str, bool]:
        """Each target with ``rate_per_s``: whether deliveries wait for its limit now."""
        return self._pacing.rate_limited()

    def circuits(self, now: float) -> dict[str, Circuit]:
        """Each target's circuit breaker: closed (healthy), open (paused after failures) or
        half-open (probing with one delivery)."""
        return {name: lane.circuit(now) for name, lane in self._lanes.items()}

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="dispatcher")
        # Open one connection to each target ahead of the first notification, so the first
        # forward does not pay for the connection set-up; a target that is down is no error.
        self._warming = [asyncio.create_task(lane.sender.warm()) for lane in self._lanes.values()]

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
        for lane in self._lanes.values():
            lane.queue.clear()  # not sent: they stay pending in the outbox
        if self._batches:
            _, late = await asyncio.wait(list(self._batches), timeout=grace_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self._retired.close()
        for lane in self._lanes.values():
            await lane.sender.close()

    async def _loop(self) -> None:
        failing: str | None = None  # the outbox's complaint, logged once until it recovers
        while not self._stopping:
            self._wake.clear()
            try:
                await self._claim()
                await self._retention.maybe_prune(self._clock(), self._lanes)
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
        if self._pacing.runs.wants_more:
            await self._extend_runs(now)
        # A paused target is not asked at all; a probing one for a single delivery; a target
        # whose budget is used up waits for its own attempts to finish.
        rooms = ((name, lane.room(now, self._capacity)) for name, lane in self._lanes.items())
        wanted = limits = {name: room for name, room in rooms if room}
        claim = await self._pacing.plan(self._outbox, limits, now)
        limits = claim.limits
        if not limits:
            return
        runs = self._pacing.runs
        self._recorded = set()
        self._replays = set()
        more: dict[str, Collection[str]] = {}
        try:
            due = await self._outbox.due(
                now,
                limits,
                exclude=self._in_flight,
                ordered=self._pacing.ordered,
                conversations=claim.conversations,
                runs=self._pacing.run_lengths(),
                more=more,
            )
        finally:
            recorded, self._recorded = self._recorded, None
            replays, self._replays = self._replays, None
        if replays:
            due = _before_replays(due, replays, self._pacing.ordered)
        busy = self._in_flight | recorded if recorded else self._in_flight
        took_s = self._clock() - now
        claimed = dict.fromkeys(limits, 0)
        started = []
        # The first of each conversation now; those behind it wait for it (ordering.Runs).
        for delivery in runs.sort(due, self._pacing.with_runs, busy):
            claimed[delivery.target] += 1
            if delivery.id in busy or delivery.id in runs.parked:
                # Offered, its run went on, or it ended, while the claim ran; or it waits in
                # a run, behind a delivery replayed meanwhile (Runs.sort).
                continue
            lane = self._lanes.get(delivery.target)  # None: removed while the query ran
            if lane is not None and lane.load < self._capacity:
                self._start(lane, delivery)
                started.append(delivery)
            elif runs.let_go(delivery.id):
                self._pacing.conversations.changed(delivery.target, delivery.order_key)
        await self._pacing.settle(self._outbox, claim, claimed, started, took_s, more)
        self._backlog = any(claimed[name] >= wanted[name] for name in limits)
        conversations = self._pacing.conversations
        if any(claimed[name] < limits[name] and conversations.more_to_ask(name) for name in limits):
            # Room left, and conversations this claim had no turn to ask about: at once.
            self._wake.set()

    async def _extend_runs(self, now: float) -> None:
        """Read what follows each run that is near its end and may have more behind it, for
        it to go on without a claim in between (ordering.Runs.extend). A run holds one place
        in its lane's budget whatever its length, so this needs no room."""
        runs = self._pacing.runs
        lengths = self._pacing.run_lengths()
        for name, lasts in runs.wanted().items():
            length = lengths.get(name)
            found: dict[str, list[Delivery]] = {}
            replays: set[str | None] = set()
            if length is not None:
                self._replays = replays
                try:
                    found = await self._outbox.following(now, name, lasts, length)
                finally:
                    self._replays = None
            for key, last in lasts.items():
                more = found.get(key, [])
                full = length is not None and len(more) >= length
                if _replayed(last, replays):
                    # The run's last delivery itself was replayed: what was read follows its
                    # new place, at the back. Its end asks for a look instead.
                    more, full = [], True
                for index, delivery in enumerate(more):
                    if (
                        delivery.id in self._in_flight
                        or delivery.id in runs.parked
                        or _replayed(delivery.id, replays)
                    ):
                        # On its way, or replayed to the back while this was read (what
                        # follows it was read behind it): the rest is a claim's.
                        more, full = more[:index], True
                        break
                runs.extend(last, more, full=full)

    def _start(self, lane: Lane, delivery: Delivery) -> None:
        self._in_flight.add(delivery.id)
        lane.push(delivery)
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
        for lane in self._lanes.values():
            while batch := lane.next_batch():
                task = asyncio.create_task(self._attempt(lane, batch))
                self._batches.add(task)
                task.add_done_callback(functools.partial(self._done, lane, batch))

    def _done(self, lane: Lane, batch: list[Delivery], task: asyncio.Task[None]) -> None:
        self._batches.discard(task)
        for delivery in batch:
            self._in_flight.discard(delivery.id)
        handed = 0
        if self._handed:
            for delivery in batch:
                ahead = self._handed.pop(delivery.id, None)
                if ahead is not None:
                    handed += 1
                    if ahead:
                        lane.ahead -= 1
        lane.load -= len(batch) - handed
        name = lane.target.name
        if not lane.load and self._leaving.get(name) is lane:
            del self._leaving[name]
            self._keep_leases()
        if self._backlog or name in self._pacing.ordered:
            # An ordered target's next delivery of each conversation waits for this outcome.
            self._wake.set()

    async def _attempt(self, lane: Lane, batch: list[Delivery]) -> None:
        # Time held by the target's pacing is left out of each delivery's age (pacing.py).
        started = self._clock()
        held = [d.held_s + self._pacing.held_s(d, started) for d in batch]
        # Taken now: a reload may renew or remove the lane while the batch is out.
        exchange = Exchange(lane, batch, self._tracing)
        try:
            await exchange.send()
        finally:
            lane.busy -= len(batch)
            if lane.queue:
                self._schedule_send()
        now = self._clock()
        # The health the judgement changes is the exchange's: its lane's when the batch left.
        probing = exchange.health.probing
        outcomes = exchange.judge(now, self._uniform, held)
        name, results = exchange.name, exchange.results
        ordered = name in self._pacing.ordered
        if ordered and probing and not exchange.health.probing:
            self._pacing.conversations.recovered(name)
        if exchange.health.probing:
            self._hold_back(name, exchange.health)
        # An ordered target's runs go on now, before these outcomes are recorded (_go_on).
        went, looks = self._go_on(lane, batch, outcomes) if ordered else ((), ())
        try:
            await self._outbox.record_many(
                [
                    (delivery.id, outcome, result)
                    for delivery, outcome, result in zip(batch, outcomes, results, strict=True)
                ],
                now,
                # A replay made while these were out (here, by another process or gateway)
                # stands over their outcomes: they go again where the replay put them.
                {delivery.id: delivery.created_at for delivery in batch},
                # Each run went on: their places in the budget are the next ones', and their
                # conversations wait for nothing from this record.
                patient=len(went) == len(batch),
            )
        except Exception:
            # Not recorded: they stay pending and are sent again later (at-least-once). Their
            # runs went on, or were let go, already (_go_on says why that keeps order).
            log.exception("could not record %d deliveries to %s", len(batch), name)
            self._pacing.conversations.changed(name, None)
            return
        if self._recorded is not None:
            self._recorded.update(delivery.id for delivery in batch)
        if ordered:
            self._announce(name, batch, outcomes, went, looks)
        report(self._observer, name, batch, exchange.attempts, outcomes, results, now)

    def _hold_back(self, name: str, health: TargetHealth) -> None:
        """``name`` failed (its breaker, ``health``, is open): let go of what waits in its
        lane's queue, as offer() does with what arrives for a failing target. Sent, those
        would reach a target just paused, one batch after another, within the Retry-After it
        asked for, each spending an attempt: they stay pending in the outbox, for the
        breaker's probes and the claims after them. Called before the send scheduled at the
        end of the failed batch runs (same turn of the event loop). Not for a lane that is
        no longer the one the batch left from (its health is another's)."""
        lane = self._lanes.get(name)
        if lane is None or lane.health is not health or not lane.queue:
            return
        runs, conversations = self._pacing.runs, self._pacing.conversations
        for delivery in lane.queue:
            self._in_flight.discard(delivery.id)
            # Its run (ordered targets) goes back to the outbox with it, in its order.
            runs.let_go(delivery.id)
            runs.drop((delivery,))
            conversations.held(name, delivery.order_key, delivery.id)
        lane.load -= len(lane.queue)
        lane.queue.clear()

    def _go_on(
        self, sent: Lane, batch: Sequence[Delivery], outcomes: Sequence[Outcome]
    ) -> tuple[set[int], list[bool]]:
        """Start the next delivery of each run whose delivery in ``batch`` ended in delivery
        or dead letter, before that outcome is recorded: the record (a transaction, and on
        SQLite a wait for company to share it) would otherwise stand between every two
        deliveries of a conversation. Nothing is sent out of order by this: the delivery
        ahead was sent and answered first. A crash, or a record that fails, before the
        outcomes of a run are all recorded leaves the unrecorded ones pending: they are sent
        again, each behind whatever of its conversation is still pending, so the target only
        sees deliveries it already took once more (it drops them by their
        ``X-Gateway-Delivery-Id``, as any resend of at-least-once delivery), never a first
        send out of order. The one that starts takes the place in the lane's budget of the
        one ahead (which is off the wire): the budget counts the deliveries a claim must not
        add to, and a run that goes on adds none. A run that ended with this answer gives its
        place back to the claims now, for the same reason: runs a look started together end
        together, and the target would otherwise wait idle for their outcomes' commit before
        the next claim (the delivery stays in flight, so no claim returns it, until its
        outcome is recorded). A run goes on only while the target is healthy: a failing one's
        claims probe it, and its places wait for the records. Returns the indexes in
        ``batch`` of the deliveries whose run went on, and for each delivery whether a claim
        must look at its conversation once its outcome is recorded."""
        conversations, runs = self._pacing.conversations, self._pacing.runs
        name = sent.target.name
        lane = self._lanes.get(name)  # None: removed while the batch was out
        healthy = lane is not None and not lane.health.probing
        went = set()
        looks = []
        freed = False
        for index, (delivery, outcome) in enumerate(zip(batch, outcomes, strict=True)):
            released = healthy and not isinstance(outcome, RetryAt)
            following, look = runs.after(delivery.id, released)
            looks.append(look)
            if following is not None and lane is not None:
                conversations.started(name, delivery.order_key, following.id)
                went.add(index)
                if lane is sent:  # else a new lane (removed, then configured again)
                    lane.load -= 1
                    self._handed[delivery.id] = False
                self._start(lane, following)
            elif released and lane is sent and lane.ahead < self._capacity:
                # Its run ended: its place goes to the claims. At most a budget's worth ahead
                # of their records, so that outcomes that cannot be recorded (a database that
                # stalls the records and not the claims) do not pile up in memory.
                lane.load -= 1
                lane.ahead += 1
                self._handed[delivery.id] = True
                freed = True
        if freed or runs.wants_more:  # a claim, or a read of what follows runs near their end
            self._wake.set()
        return went, looks

    def _announce(
        self,
        name: str,
        batch: Sequence[Delivery],
        outcomes: Sequence[Outcome],
        went: Collection[int],
        looks: Sequence[bool],
    ) -> None:
        """Now that ``batch``'s outcomes are recorded: a conversation whose run was cut short
        or let go is looked at by the next claim; one whose first delivery is retried, once
        the retry is due; one whose run did not go on (``went``: by index), when something is
        known to wait in it."""
        conversations = self._pacing.conversations
        if self._pacing.lined_up:
            # The outbox keeps the conversations: only a retry's time is noted (for the sleep).
            for delivery, outcome in zip(batch, outcomes, strict=True):
                if isinstance(outcome, RetryAt):
                    conversations.retry_at(name, delivery.order_key, outcome.at)
            return
        for index, (delivery, outcome) in enumerate(zip(batch, outcomes, strict=True)):
            key = delivery.order_key
            if looks[index]:
                conversations.changed(name, key)
            if isinstance(outcome, RetryAt):
                conversations.retry_at(name, key, outcome.at)
            elif index not in went:
                conversations.finished(name, key)
