"""One batch's exchange with its target: send it, then judge what came back.

Rule: the target's sender, health and retry policy are the ones its lane had when the batch
started; a reload that renews or removes the lane meanwhile changes nothing here. The target
takes one verdict per batch (a batch is one exchange with it, and a target that is down fails
every request in it at once); each attempt gets its outcome from
:func:`gateway.delivery.outcome.classify` alone, and its span (when traced) ends with it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from gateway.delivery.backoff import RetryPolicy, TargetHealth
from gateway.delivery.lanes import Lane
from gateway.delivery.outcome import AttemptResult, Outcome, classify, is_transient
from gateway.delivery.reporting import OUTCOMES
from gateway.delivery.sending import Sender
from gateway.outbox import Delivery

if TYPE_CHECKING:
    # Annotations only: with tracing off no OpenTelemetry module is imported at all.
    from gateway.tracing import Attempts, Tracing

__all__ = ["Exchange"]

# The dispatcher's logger: its lines have always been named after it.
log = logging.getLogger("gateway.delivery.dispatcher")


class Exchange:
    """A batch of attempts to one target, from the spans' start to each attempt's outcome."""

    __slots__ = (
        "attempts",
        "batch",
        "health",
        "name",
        "policy",
        "results",
        "sender",
        "spans",
        "tracing",
    )

    def __init__(self, lane: Lane, batch: Sequence[Delivery], tracing: Tracing | None) -> None:
        """``tracing``: one CLIENT span per attempt, started now, when [tracing] is enabled
        (one plain record for the batch: :class:`~gateway.tracing.records.Attempts`)."""
        self.tracing = tracing
        self.sender: Sender = lane.sender
        self.health: TargetHealth = lane.health
        self.policy: RetryPolicy = lane.policy
        self.name = lane.target.name
        self.batch = batch
        self.attempts = [delivery.attempts + 1 for delivery in batch]
        self.results: list[AttemptResult] = []
        self.spans: Attempts | None = (
            None
            if tracing is None
            else tracing.attempts(
                self.sender.target.url,
                self.name,
                [(d.id, d.trace, n) for d, n in zip(batch, self.attempts, strict=True)],
                self.sender.target.kind,
            )
        )

    async def send(self) -> None:
        """Send the batch; ``results`` holds what came back for each delivery, in order."""
        batch, spans = self.batch, self.spans
        try:
            try:
                self.results = await self.sender.send_many(
                    batch, self.attempts, None if spans is None else spans.headers
                )
            except Exception as exc:
                # Still failed attempts: recorded and backed off like any other, rather than a
                # dead task whose deliveries are claimed again at once, in a tight loop.
                log.exception("attempts of %d deliveries to %s failed", len(batch), self.name)
                error = f"{type(exc).__name__}: {exc}"[:300]
                self.results = [AttemptResult(error=error)] * len(batch)
        except BaseException:
            # Stopped mid-batch: the attempts stay pending; their spans say so.
            if spans is not None and self.tracing is not None:
                self.tracing.end_attempts(spans, [(None, "stopped", "retry")] * len(batch))
            raise

    def judge(
        self, now: float, uniform: Callable[[float, float], float], held: Sequence[float]
    ) -> list[Outcome]:
        """The target's verdict on the batch, and each attempt's outcome at ``now``;
        ``held``: each delivery's time held back by its target's pacing, not part of its age."""
        health, policy, results = self.health, self.policy, self.results
        if any(is_transient(result) for result in results):
            asked = [r.retry_after_s for r in results if r.retry_after_s and is_transient(r)]
            health.failed(now, policy, uniform, max(asked, default=0.0))
        elif health.probing:
            log.info("target %s answers again", self.name)
            health.succeeded()
        outcomes = [
            classify(
                result,
                attempt=attempt,
                created_at=delivery.created_at,
                now=now,
                policy=policy,
                uniform=uniform,
                held_s=held_s,
            )
            for delivery, attempt, result, held_s in zip(
                self.batch, self.attempts, results, held, strict=True
            )
        ]
        if self.spans is not None and self.tracing is not None:
            self.tracing.end_attempts(
                self.spans,
                [
                    (result.status, result.error, OUTCOMES[type(outcome)])
                    for outcome, result in zip(outcomes, results, strict=True)
                ],
            )
        return outcomes
