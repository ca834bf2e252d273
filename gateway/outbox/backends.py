"""Choosing the outbox backend the configuration asks for.

Rule: the only code outside a backend's own package that names a backend; everything else gets
an :class:`~gateway.outbox.interface.Outbox`. ``outbox.url`` set: PostgreSQL; otherwise the
SQLite file at ``outbox.path``. Each backend is imported only when it is asked for: the
PostgreSQL driver is an optional extra, and the outbox's values (:mod:`gateway.outbox.model`)
load no storage engine for the modules that only name them (routing, the command line's parsing).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Protocol

from gateway.config import OutboxConfig
from gateway.errors import OutboxError
from gateway.outbox.interface import Outbox

__all__ = ["OutboxHold", "backup_outbox", "describe_outbox", "hold_outbox", "open_outbox"]


class OutboxHold(Protocol):
    """This gateway's exclusive claim on an outbox, until released."""

    def release(self) -> None: ...


class _Shared:
    """A database outbox is shared by every gateway configured with it: nothing to hold."""

    def release(self) -> None:
        return None


def hold_outbox(config: OutboxConfig) -> OutboxHold:
    """Claim the configured outbox for this gateway alone (for its lifetime, or until
    released); raises :class:`~gateway.errors.OutboxError` when another gateway holds it.
    A PostgreSQL outbox (``outbox.url``) is meant to be shared: its hold holds nothing."""
    if config.url is not None:
        return _Shared()
    from gateway.outbox.sqlite.owner import OwnerLock

    return OwnerLock(config.path)


def _postgres() -> ModuleType:
    try:
        from gateway.outbox.postgres import outbox
    except ImportError as exc:
        raise OutboxError(
            f"outbox.url needs the PostgreSQL driver ({exc.name} is not installed):"
            " pip install 'waba-gateway[postgres]'"
        ) from None
    return outbox


async def open_outbox(
    config: OutboxConfig,
    *,
    on_commit: Callable[[int], None] | None = None,
    create: bool = True,
    dispatching: bool = True,
    on_wake: Callable[[], None] | None = None,
    on_replay: Callable[[str | None], None] | None = None,
) -> Outbox:
    """The configured outbox, open. ``on_commit`` hears the size of each group committed;
    ``create=False`` refuses an outbox that does not exist yet (the command line's reads).
    Shared outboxes only: ``dispatching`` says whether this process sends the deliveries it
    accepts (it then holds their lease), and ``on_wake`` hears another gateway announce
    deliveries. ``on_replay`` (either outbox) hears of replays made elsewhere (another
    gateway's, or ``waba-gateway deliveries replay``'s): the id replayed, ``None`` for many.
    Raises :class:`~gateway.errors.OutboxError` when it cannot be opened."""
    if config.url is not None:
        outbox: Outbox = await _postgres().PostgresOutbox.open(
            config,
            dispatching=dispatching,
            on_commit=on_commit,
            on_wake=on_wake,
            create=create,
            on_replay=on_replay,
        )
        return outbox
    from gateway.outbox.sqlite.outbox import SqliteOutbox

    return SqliteOutbox(
        config.path,
        dedup_window_s=config.dedup_window_s,
        busy_timeout_s=config.busy_timeout_s,
        on_commit=on_commit,
        create=create,
        on_replay=on_replay,
    )


async def describe_outbox(config: OutboxConfig) -> str:
    """What ``check`` reports about the outbox, changing nothing: a database's reachability
    and schema version, or a SQLite file's layout, integrity and backlog. Raises OutboxError
    for what ``serve`` would refuse."""
    if config.url is None:
        from gateway.outbox.sqlite import layout

        return await asyncio.to_thread(layout.describe, config.path)
    text: str = await _postgres().inspect(config)
    return text


async def backup_outbox(config: OutboxConfig, destination: Path) -> str:
    """Copy the SQLite outbox, consistent while a gateway writes it, to the new file
    ``destination``; the line that says what the copy holds. Raises OutboxError (also for a
    PostgreSQL outbox, which the database's own tools back up)."""
    if config.url is not None:
        raise OutboxError(
            "outbox.url: a PostgreSQL outbox is backed up with the database's own tools"
            " (pg_dump --schema=waba_gateway), not by the gateway"
        )
    from gateway.outbox.sqlite.backup import backup_file

    summary = await asyncio.to_thread(
        backup_file, config.path, destination, busy_timeout_s=config.busy_timeout_s
    )
    return (
        f"backed up {config.path} to {destination}: {summary.notifications} notifications,"
        f" {summary.deliveries} deliveries, layout {summary.layout}, check ok"
    )
