"""What the operator's front door works on: the running gateway, as the admin API and the
console see it.

Rule: the admin API and the console know the gateway only through :class:`Operations`, so the
runtime that wires the process (the gateway's own listeners, or a core inside someone else's
aiohttp application) provides it, and nothing here imports the runtime. A name either of them
takes from a request to look up in the outbox (a target's) passes :func:`outbox_text` first, so
both refuse the same values with the same reason, whichever backend holds the outbox.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, overload

from gateway.admin.stats import Snapshot, Stats
from gateway.config import Config
from gateway.delivery.backoff import Breaker
from gateway.errors import BadRequest
from gateway.outbox import Outbox

__all__ = ["Operations", "ReloadResult", "outbox_text"]


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
    async def reload_confirmed(self) -> ReloadResult: ...
    async def snapshot(self) -> Snapshot: ...


@overload
def outbox_text(name: str, value: str) -> str: ...
@overload
def outbox_text(name: str, value: str | None) -> str | None: ...
def outbox_text(name: str, value: str | None) -> str | None:
    """``value``, the request's ``name`` (a query parameter or a part of the path, ``None``:
    not given), if the outbox can compare it with what it holds; otherwise BadRequest (400).

    PostgreSQL's text cannot hold a NUL character, and neither backend can encode a lone
    surrogate. Handed to the outbox, such a value is a driver error, which would be answered as
    an outage (503, logged at ERROR) on PostgreSQL while SQLite answered 200: it is refused as
    the bad input it is, alike on both backends.
    """
    if value is None:
        return None
    if "\x00" in value:
        raise BadRequest(f"{name} must not contain a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{name} must be text that UTF-8 can encode") from None
    return value
