"""How long a failed admin authentication waits before its answer, per client address.

Rule: each failure from an address waits a little longer than the one before (doubling from
:data:`FIRST_WAIT_S` up to :data:`MAX_STEP_S`), and failures from one address queue behind each
other, so parallel connections guess no faster than one; no answer ever waits more than
:data:`MAX_WAIT_S`. An address's count is forgotten :data:`FORGET_AFTER_S` after its last
failure, or at once when it authenticates; at most :data:`MAX_ADDRESSES` addresses are
remembered (the longest quiet are dropped first), so the memory it takes is bounded whatever a
client sends. A success is never delayed: an operator who types the token right gets in at once.

Pure: the clock is a parameter, and the caller does the waiting.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

__all__ = [
    "FIRST_WAIT_S",
    "FORGET_AFTER_S",
    "MAX_ADDRESSES",
    "MAX_STEP_S",
    "MAX_WAIT_S",
    "AuthThrottle",
]

FIRST_WAIT_S = 0.05
MAX_STEP_S = 1.0
MAX_WAIT_S = 2.0
FORGET_AFTER_S = 300.0
MAX_ADDRESSES = 4096


@dataclass(slots=True)
class _Failures:
    count: int
    last: float
    free_at: float  # when the answer to the latest failure goes out


class AuthThrottle:
    """Failed authentications per client address, and the wait each one gets."""

    def __init__(self) -> None:
        self._seen: OrderedDict[str, _Failures] = OrderedDict()

    def failed(self, address: str, now: float) -> float:
        """One more failure from ``address`` at ``now``: the seconds to wait before answering."""
        entry = self._seen.pop(address, None)
        if entry is None or now - entry.last >= FORGET_AFTER_S:
            entry = _Failures(count=0, last=now, free_at=now)
        step = min(FIRST_WAIT_S * 2.0**entry.count, MAX_STEP_S)
        free_at = min(max(now, entry.free_at) + step, now + MAX_WAIT_S)
        entry.count = min(entry.count + 1, 32)  # 2**32 * FIRST_WAIT_S is far past MAX_STEP_S
        entry.last = now
        entry.free_at = free_at
        self._seen[address] = entry  # the most recent last
        while len(self._seen) > MAX_ADDRESSES:
            self._seen.popitem(last=False)
        return free_at - now

    def succeeded(self, address: str) -> None:
        """``address`` authenticated: its failures are forgotten."""
        self._seen.pop(address, None)

    def __len__(self) -> int:
        return len(self._seen)
