"""The reads only the admin console makes: one delivery, its attempts, the backlog per target.

Rule: as in :mod:`gateway.outbox.sqlite.store`, plain functions of a ``sqlite3.Connection``, run
inside a transaction their caller owns. The attempts table they read is written by
:func:`gateway.outbox.sqlite.store.record_attempts` and pruned with its deliveries.
"""

from __future__ import annotations

import sqlite3

from gateway.outbox.model import AttemptRecord, Delivery
from gateway.outbox.rows import DELIVERY_COLUMNS, delivery_from_row, rowid_of

__all__ = ["attempt_history", "get_delivery"]


def get_delivery(conn: sqlite3.Connection, delivery_id: str, prefix: str) -> Delivery | None:
    """Delivery ``delivery_id`` of this file, or ``None``."""
    rowid = rowid_of(delivery_id, prefix)
    if rowid is None:
        return None
    row = conn.execute(
        f"SELECT {DELIVERY_COLUMNS} FROM deliveries d"  # noqa: S608 (constant)
        " JOIN notifications n ON n.id = d.notification_id WHERE d.id = ?",
        (rowid,),
    ).fetchone()
    return None if row is None else delivery_from_row(row, prefix)


def attempt_history(conn: sqlite3.Connection, delivery_id: str, prefix: str) -> list[AttemptRecord]:
    """The attempts recorded for ``delivery_id``, oldest first (none for an unknown id)."""
    rowid = rowid_of(delivery_id, prefix)
    if rowid is None:
        return []
    rows = conn.execute(
        "SELECT number, at, state, status, error, response FROM attempts"
        " WHERE delivery_id = ? ORDER BY id",
        (rowid,),
    ).fetchall()
    return [
        AttemptRecord(number=n, at=at, state=state, status=status, error=error, response=resp)
        for n, at, state, status, error, resp in rows
    ]
