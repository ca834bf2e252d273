"""Waiting until delivery has settled, so that a count of what a target received is final.

Rule: "exactly once" is counted only once the outbox reports nothing pending (every attempt's
outcome recorded, nothing left to retry) *and* the target has received nothing for
:data:`QUIET_S`. A fixed sleep instead would pass by luck on a slow machine (the duplicate not
sent yet) and waste time on a fast one.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from pgserver import PgServer
from sink import DEADLINE_S

from gateway.runtime.gateway import Gateway

__all__ = [
    "QUIET_S",
    "pending_in_gateway",
    "pending_in_metrics",
    "pending_in_postgres",
    "pending_in_sqlite",
    "until_settled",
]

# Six dispatcher polls (0.05 s in the tests' configurations) and longer than their retry waits
# (0.05 s to 0.2 s): with nothing pending, a delivery sent twice would show up within it.
QUIET_S = 0.3
_POLL_S = 0.05


async def until_settled(
    pending: Callable[[], Awaitable[int]], received: Callable[[], int], *, quiet_s: float = QUIET_S
) -> None:
    """Return once ``pending()`` is 0 and ``received()`` has not changed for ``quiet_s``."""
    deadline = time.monotonic() + DEADLINE_S
    seen, since = received(), time.monotonic()
    while True:
        left = await pending()
        now_seen = received()
        if now_seen != seen or left:
            seen, since = now_seen, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"delivery did not settle: {left} pending, {now_seen} received and counting"
            )
        await asyncio.sleep(_POLL_S)


def pending_in_gateway(gateway: Gateway) -> Callable[[], Awaitable[int]]:
    """The in-process gateway's pending deliveries, as its own outbox counts them."""

    async def pending() -> int:
        return sum(each.pending for each in await gateway.outbox.backlog())

    return pending


def pending_in_metrics(admin_port: int) -> Callable[[], Awaitable[int]]:
    """A gateway process's pending deliveries, summed over targets from its ``/metrics``
    (``waba_gateway_target_pending_deliveries``; a target with no sample has none)."""

    async def pending() -> int:
        url = f"http://127.0.0.1:{admin_port}/metrics"
        try:
            async with aiohttp.ClientSession() as session, session.get(url) as response:
                assert response.status == 200, f"/metrics answered {response.status}"
                text = await response.text()
        except aiohttp.ClientConnectionError:
            # With workers, the admin listener (worker 0's) may come up after the main one:
            # not known yet counts as not settled.
            return 1
        samples = [
            line.split()[-1]
            for line in text.splitlines()
            if line.startswith("waba_gateway_target_pending_deliveries{")
        ]
        return sum(int(float(value)) for value in samples)

    return pending


def pending_in_sqlite(path: Path) -> Callable[[], Awaitable[int]]:
    """The pending deliveries in the SQLite outbox at ``path``, read on a connection of the
    test's own (the gateway that writes it is another process)."""

    def count() -> int:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            (found,) = conn.execute(
                "SELECT count(*) FROM deliveries WHERE state = 'pending'"
            ).fetchone()
            return int(found)

    async def pending() -> int:
        return await asyncio.to_thread(count)

    return pending


def pending_in_postgres(server: PgServer, database: str) -> Callable[[], Awaitable[int]]:
    """The pending deliveries in the PostgreSQL outbox in ``database``, read through psql."""

    async def pending() -> int:
        sql = "SELECT count(*) FROM waba_gateway.deliveries WHERE state = 'pending'"
        return int(await asyncio.to_thread(server.psql, sql, database))

    return pending
