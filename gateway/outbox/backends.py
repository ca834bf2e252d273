"""Choosing the outbox backend the configuration asks for.

Rule: the only code outside a backend's own package that names a backend; everything else gets
an :class:`~gateway.outbox.interface.Outbox`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from gateway.config import OutboxConfig
from gateway.outbox.interface import Outbox
from gateway.outbox.sqlite.outbox import SqliteOutbox
from gateway.outbox.sqlite.owner import OwnerLock

__all__ = ["OutboxHold", "hold_outbox", "open_outbox"]


class OutboxHold(Protocol):
    """This gateway's exclusive claim on an outbox, until released."""

    def release(self) -> None: ...


def hold_outbox(config: OutboxConfig) -> OutboxHold:
    """Claim the configured outbox for this gateway alone (for its lifetime, or until
    released); raises :class:`~gateway.errors.OutboxError` when another gateway holds it."""
    return OwnerLock(config.path)


def open_outbox(
    config: OutboxConfig,
    *,
    on_commit: Callable[[int], None] | None = None,
    create: bool = True,
) -> Outbox:
    """The configured outbox, open. ``on_commit`` hears the size of each group committed;
    ``create=False`` refuses an outbox that does not exist yet (the command line's reads).
    Raises :class:`~gateway.errors.OutboxError` when it cannot be opened."""
    return SqliteOutbox(
        config.path,
        dedup_window_s=config.dedup_window_s,
        busy_timeout_s=config.busy_timeout_s,
        on_commit=on_commit,
        create=create,
    )
