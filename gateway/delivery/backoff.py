"""When to try a delivery again: exponential backoff with full jitter, or an explicit schedule.

Rule: one clamped formula, pure, with the randomness injected. The vocabulary is stamina's
(``attempts``, ``wait_initial``, ``wait_max``, ``wait_exp_base``). Full jitter (a uniform draw
between zero and the capped exponential) spreads the retries of many deliveries that failed
together, so a target coming back is not hit by all of them at once. A target's ``retry_schedule_s``
replaces the formula with the waits as written, the last one repeated (``attempts`` and
``max_age_s`` still end it); a target's ``Retry-After`` wins over either when it is longer
(:func:`gateway.delivery.outcome.classify`).
"""

from __future__ import annotations

import datetime
import email.utils
import random
from collections.abc import Callable
from dataclasses import dataclass

from gateway.config import TargetConfig

__all__ = [
    "RETRY_AFTER_LONGEST_S",
    "Breaker",
    "RetryPolicy",
    "TargetHealth",
    "parse_retry_after",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    attempts: int
    wait_initial_s: float
    wait_max_s: float
    wait_exp_base: float = 2.0
    max_age_s: float
    # The waits after failed attempts 1, 2, ...; the last repeated. Empty: the formula.
    schedule: tuple[float, ...] = ()

    @classmethod
    def for_target(cls, target: TargetConfig) -> RetryPolicy:
        return cls(
            attempts=target.attempts,
            wait_initial_s=target.wait_initial_s,
            wait_max_s=target.wait_max_s,
            wait_exp_base=target.wait_exp_base,
            max_age_s=target.max_age_s,
            schedule=target.retry_schedule_s,
        )

    def cap(self, attempt: int) -> float:
        """The longest wait after failed attempt number ``attempt`` (1-based)."""
        if self.schedule:
            return self.schedule[min(max(attempt, 1), len(self.schedule)) - 1]
        exponent = max(attempt - 1, 0)
        # Clamp the exponent before raising: 2.0 ** 2000 overflows a float.
        if exponent > 64:
            return self.wait_max_s
        return min(self.wait_max_s, self.wait_initial_s * self.wait_exp_base**exponent)

    def delay(
        self, attempt: int, uniform: Callable[[float, float], float] = random.uniform
    ) -> float:
        """Seconds to wait after failed attempt ``attempt``: a full-jitter draw in [0, cap], or
        the schedule's wait exactly (an operator who wrote the waits meant them)."""
        if self.schedule:
            return self.cap(attempt)
        return uniform(0.0, self.cap(attempt))


@dataclass(slots=True)
class TargetHealth:
    """A circuit breaker for one target.

    Without it, a target that is down would be sent every due delivery at once, each failing in
    turn: with a large backlog that is a storm of refused connections and outbox writes that
    slows the acknowledgement path, for nothing. After a transient failure the target is paused
    for a backoff, then probed with one delivery at a time until one succeeds.
    """

    failures: int = 0
    paused_until: float = 0.0

    def failed(
        self,
        now: float,
        policy: RetryPolicy,
        uniform: Callable[[float, float], float] = random.uniform,
        retry_after_s: float = 0.0,
    ) -> None:
        """The target failed at ``now``; ``retry_after_s``: the longest ``Retry-After`` it
        sent with the failure. The pause lasts at least that long (RFC 9110 10.2.3): probing
        a target within the time it asked for would only spend the probes' attempts."""
        if now < self.paused_until:
            # Attempts that were already in flight when the target went away fail together:
            # they are one failure of the target, not many, so the pause does not escalate;
            # it only lasts as long as the target asks.
            self.paused_until = max(self.paused_until, now + retry_after_s)
            return
        self.failures += 1
        self.paused_until = now + max(policy.delay(self.failures, uniform), retry_after_s)

    def succeeded(self) -> None:
        self.failures = 0
        self.paused_until = 0.0

    def admits(self, now: float, in_flight: int) -> bool:
        """Whether a delivery to this target may start now (``probing`` limits it to one)."""
        if self.failures == 0:
            return True
        return now >= self.paused_until and in_flight == 0

    @property
    def probing(self) -> bool:
        return self.failures > 0

    def breaker(self, now: float) -> Breaker:
        """What an operator reads of this breaker at ``now``."""
        if self.failures == 0:
            state = "closed"
        elif now < self.paused_until:
            state = "open"
        else:
            state = "half-open"
        return Breaker(state=state, failures=self.failures, paused_until=self.paused_until)


@dataclass(frozen=True, slots=True, kw_only=True)
class Breaker:
    """A read-only view of a target's circuit breaker: ``closed`` (deliveries flow), ``open``
    (paused until ``paused_until`` after ``failures`` failures in a row) or ``half-open``
    (probing with one delivery at a time)."""

    state: str
    failures: int
    paused_until: float


# The longest wait a Retry-After is read as (about 31 years): longer than any delivery may
# wait (max_age_s) or a pause means anything, and still a finite float to add to a time.
RETRY_AFTER_LONGEST_S = 1e9


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (RFC 9110 section 10.2.3): either
    delay-seconds or an HTTP-date. ``None`` when absent or unreadable; never negative, never
    more than :data:`RETRY_AFTER_LONGEST_S`, and never an exception, whatever the target sent."""
    if value is None:
        return None
    text = value.strip()
    # delay-seconds = 1*DIGIT, ASCII digits only (RFC 9110 section 10.2.3, RFC 5234 B.1):
    # str.isdigit() takes other scripts' digits too. Read without int(), which refuses more
    # than 4,300 digits; a value that long only says "longer than anything".
    if text.isascii() and text.isdigit():
        digits = text.lstrip("0") or "0"
        if len(digits) > len(str(int(RETRY_AFTER_LONGEST_S))):
            return RETRY_AFTER_LONGEST_S
        return min(float(digits), RETRY_AFTER_LONGEST_S)
    try:
        when = email.utils.parsedate_to_datetime(text)
        if when.tzinfo is None:
            # The asctime form names no zone; every HTTP-date is GMT (RFC 9110 section
            # 5.6.7), never the host's local time.
            when = when.replace(tzinfo=datetime.UTC)
        wait = when.timestamp() - now
    except (TypeError, ValueError, IndexError, OverflowError):
        # OverflowError: fields too large for a C integer ("99999999999999999999:00:00").
        return None
    return min(max(0.0, wait), RETRY_AFTER_LONGEST_S)
