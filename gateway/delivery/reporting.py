"""What the dispatcher says of each attempt once its outcome is recorded: a log line and a metric.

Rule: a log line names the delivery id, the target, the attempt and the target's HTTP status,
never the body or anything from it. A delivered attempt, the usual outcome, is logged at DEBUG
only, and its structured fields are built only when that line is written.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from gateway.delivery.outcome import AttemptResult, DeadLetter, Delivered, Outcome, RetryAt
from gateway.outbox import Delivery

__all__ = ["IGNORE", "OUTCOMES", "Observer", "report"]

log = logging.getLogger("gateway.delivery.dispatcher")

# An attempt's outcome as its span and metric name it: the words its log line uses.
OUTCOMES: dict[type, str] = {Delivered: "delivered", RetryAt: "retry", DeadLetter: "dead"}


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


IGNORE: Observer = _Ignore()


def report(
    observer: Observer,
    name: str,
    batch: Sequence[Delivery],
    attempts: Sequence[int],
    outcomes: Sequence[Outcome],
    results: Sequence[AttemptResult],
    now: float,
) -> None:
    """Count and log the recorded outcome of each attempt of a batch to target ``name``."""
    debugging = log.isEnabledFor(logging.DEBUG)
    for delivery, attempt, outcome, result in zip(batch, attempts, outcomes, results, strict=True):
        if isinstance(outcome, Delivered):
            observer.attempted(name, "delivered", max(0.0, now - delivery.created_at))
            if debugging:
                log.debug(
                    "delivered %s to %s",
                    delivery.id,
                    name,
                    extra=_fields(delivery, name, attempt, result) | {"outcome": "delivered"},
                )
            continue
        fields = _fields(delivery, name, attempt, result)
        if isinstance(outcome, RetryAt):
            observer.attempted(name, "retry", None)
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
            observer.attempted(name, "dead", None)
            log.warning(
                "delivery %s to %s dead-lettered: %s",
                delivery.id,
                name,
                outcome.reason,
                extra=fields | {"outcome": "dead", "reason": outcome.reason},
            )


def _fields(delivery: Delivery, target: str, attempt: int, result: AttemptResult) -> dict[str, Any]:
    """The structured fields of an attempt's log line."""
    return {
        "delivery_id": delivery.id,
        "target": target,
        "attempt": attempt,
        "status": result.status,
    }
