"""What one delivery attempt means: delivered, retry at a time, or dead letter.

Rule: this is the only place that classifies delivery outcomes. RFC 9110 status semantics drive
it: 2xx is success; 408, 429 and 5xx are transient and retried, as are timeouts and connection
errors; any other status (3xx, 4xx) means the target will never accept this body, so retrying
would only delay the operator's attention: it is dead-lettered at once. Targets that are not HTTP
say the same in kind-neutral terms: ``accepted`` (a broker's acknowledgement) is success, an error
marked ``permanent`` is dead-lettered at once, any other error is transient.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from gateway.delivery.backoff import RetryPolicy
from gateway.outbox.model import AttemptResult, DeadLetter, Delivered, Outcome, RetryAt

__all__ = [
    "AttemptResult",
    "DeadLetter",
    "Delivered",
    "Outcome",
    "RetryAt",
    "classify",
    "is_transient",
]

_RETRYABLE_4XX = frozenset({408, 429})


def is_transient(result: AttemptResult) -> bool:
    """The target could not take the request now (5xx, 408, 429, no response) and may later."""
    if result.accepted or result.permanent:
        return False
    status = result.status
    if status is None:
        return True
    return status >= 500 or status in _RETRYABLE_4XX


def classify(
    result: AttemptResult,
    *,
    attempt: int,
    created_at: float,
    now: float,
    policy: RetryPolicy,
    uniform: Callable[[float, float], float] = random.uniform,
    held_s: float = 0.0,
) -> Outcome:
    """Classify attempt number ``attempt`` (1-based) of a delivery first queued at
    ``created_at``. A retry is never scheduled past ``created_at + held_s +
    policy.max_age_s``: ``held_s`` is the time the delivery spent held by its target's pacing
    (waiting, due, for a token or for an earlier delivery of its conversation), which is no
    failure of it and does not bring its dead letter closer. A retry carries it on."""
    status = result.status
    if result.accepted or (status is not None and 200 <= status < 300):
        return Delivered()
    what = result.describe()
    if not is_transient(result):
        return DeadLetter(f"{what}: not retryable")
    if attempt >= policy.attempts:
        return DeadLetter(f"{what}: gave up after {attempt} attempt(s)")
    wait = policy.delay(attempt, uniform)
    if result.retry_after_s is not None:
        # Honour the target's Retry-After (RFC 9110 10.2.3): never earlier than it asks.
        wait = max(wait, result.retry_after_s)
    at = now + wait
    if at > created_at + held_s + policy.max_age_s:
        return DeadLetter(f"{what}: max_age_s ({policy.max_age_s:g}) would be exceeded")
    return RetryAt(at, what, held_s)
