"""A target's rate limit: a token bucket of ``burst`` tokens refilled at ``rate_per_s``.

Rule: pure arithmetic on values, with the time passed in. A delivery starts only with a token;
waiting for one is not an attempt (nothing is sent, nothing recorded), so it neither uses up
``attempts`` nor moves the retry schedule on. Over any span of ``t`` seconds a target receives at
most ``burst + rate_per_s * t`` deliveries.

Where the bucket lives: with an outbox one dispatcher owns (SQLite: one gateway per file, its
dispatcher in one process) this bucket, in the dispatcher; with an outbox several gateways share
(PostgreSQL) a row of the database, taken with the same arithmetic on the database's clock
(:meth:`gateway.outbox.Outbox.take_tokens`), so the limit holds for the deployment as a whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["TokenBucket"]


@dataclass(slots=True)
class TokenBucket:
    rate_per_s: float
    burst: int
    tokens: float
    at: float

    @classmethod
    def full(cls, rate_per_s: float, burst: int, now: float) -> TokenBucket:
        """A bucket that may send ``burst`` deliveries at once from ``now``."""
        return cls(rate_per_s=rate_per_s, burst=burst, tokens=float(burst), at=now)

    def retuned(self, rate_per_s: float, burst: int, now: float) -> TokenBucket:
        """This bucket under new settings (a reload): the tokens it holds at ``now``, at most
        the new ``burst``. Not a full one: a reload made right after a burst was spent would
        hand out a second burst at once, even one that lowered the rate."""
        self._refill(now)
        return TokenBucket(
            rate_per_s=rate_per_s, burst=burst, tokens=min(self.tokens, float(burst)), at=self.at
        )

    def _refill(self, now: float) -> None:
        # A clock that steps back refills nothing, rather than draining the bucket.
        elapsed = max(0.0, now - self.at)
        self.tokens = min(float(self.burst), self.tokens + elapsed * self.rate_per_s)
        self.at = max(self.at, now)

    def take(self, now: float, want: int) -> int:
        """Take up to ``want`` whole tokens at ``now``; return how many were taken."""
        self._refill(now)
        granted = max(0, min(want, math.floor(self.tokens)))
        self.tokens -= granted
        return granted

    def give_back(self, count: int) -> None:
        """Return tokens taken and not used (fewer deliveries were due than taken for)."""
        self.tokens = min(float(self.burst), self.tokens + count)

    def wait_s(self, now: float) -> float:
        """Seconds from ``now`` until the next whole token."""
        self._refill(now)
        if self.tokens >= 1:
            return 0.0
        return (1 - self.tokens) / self.rate_per_s
