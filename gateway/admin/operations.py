"""What the operator's front door works on: the running gateway, as the admin API and the
console see it.

Rule: the admin API and the console know the gateway only through :class:`Operations`, so the
runtime that wires the process (the gateway's own listeners, or a core inside someone else's
aiohttp application) provides it, and nothing here imports the runtime.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from gateway.admin.stats import Snapshot, Stats
from gateway.config import Config
from gateway.delivery.backoff import Breaker
from gateway.outbox import Outbox

__all__ = ["Operations", "ReloadResult"]


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """``ok``, and the one line that says what happened (logged, answered, printed)."""

    ok: bool
    message: str


class Operations(Protocol):
    """What the admin API works on (the running :class:`~gateway.runtime.gateway.Gateway`)."""

    @property
    def config(self) -> Config: ...
    @property
    def outbox(self) -> Outbox: ...
    @property
    def stats(self) -> Stats: ...
    def wake(self) -> None: ...
    def replayed(self, delivery_id: str | None) -> None: ...
    def breakers(self) -> Mapping[str, Breaker]: ...
    def reload(self) -> ReloadResult: ...
    async def snapshot(self) -> Snapshot: ...
