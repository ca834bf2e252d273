"""Waiting, in a test, for PostgreSQL statements to come to wait for a lock."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest

__all__ = ["waiting_on_locks"]


async def waiting_on_locks(conn: asyncpg.Connection[Any], count: int) -> None:
    """Return once ``count`` backends of this database wait for a lock (at most 10 s, then the
    test fails); ``conn`` outside a transaction, which would see one snapshot of the
    activity."""
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND datname = current_database()"
        )
        if waiting >= count:
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"fewer than {count} statements came to wait for a row lock")
