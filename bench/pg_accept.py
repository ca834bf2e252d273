"""asyncpg against psycopg 3 on the outbox's ack path: one notification and its delivery
committed per acknowledgement, by many concurrent requests, on a throw-away local server.

    PYTHONPATH=.:tests/support python bench/pg_drivers.py [--count 3000] [--concurrency 64]

Each driver runs the same statement (the deduplication upsert, the notification and its delivery
in one statement, committed on its own with synchronous_commit on) from a pool of connections;
asyncpg also runs it in group commits (the statements of one turn of the event loop pipelined in
one transaction). Prints acknowledgements per second and the latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import time
from collections.abc import Awaitable, Callable

import asyncpg
import psycopg
import psycopg_pool
from pgserver import running_server

SCHEMA = """
DROP TABLE IF EXISTS deliveries, notifications, digests;
CREATE TABLE digests (digest BYTEA PRIMARY KEY, received_at DOUBLE PRECISION NOT NULL);
CREATE TABLE notifications (id BIGSERIAL PRIMARY KEY, received_at DOUBLE PRECISION NOT NULL,
    signature TEXT NOT NULL, body BYTEA NOT NULL);
CREATE TABLE deliveries (id BIGSERIAL PRIMARY KEY, notification_id BIGINT NOT NULL
    REFERENCES notifications (id), target TEXT NOT NULL, body BYTEA, state TEXT NOT NULL,
    next_attempt_at DOUBLE PRECISION NOT NULL);
"""
ACCEPT = """
WITH d AS (INSERT INTO digests VALUES ($1, $2) ON CONFLICT (digest) DO UPDATE
    SET received_at = EXCLUDED.received_at WHERE digests.received_at < $2 - 604800 RETURNING 1),
n AS (INSERT INTO notifications (received_at, signature, body) SELECT $2, $3, $4 FROM d
    RETURNING id)
INSERT INTO deliveries (notification_id, target, state, next_attempt_at)
SELECT n.id, $5, 'pending', $2 FROM n RETURNING id
"""


def _args(i: int) -> tuple[bytes, float, str, bytes, str]:
    body = b'{"object":"whatsapp_business_account","n":%d,"pad":"%s"}' % (i, b"x" * 1500)
    return hashlib.sha256(body).digest(), time.time(), "sha256=" + "0" * 64, body, "t"


async def _drive(
    name: str, accept: Callable[[int], Awaitable[None]], count: int, concurrency: int
) -> None:
    latencies: list[float] = []
    queue = iter(range(count))

    async def client() -> None:
        for i in queue:
            start = time.perf_counter()
            await accept(i)
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    took = time.perf_counter() - start
    cuts = statistics.quantiles(latencies, n=100)
    print(
        f"{name:<28} {count / took:8.0f} acks/s   p50 {cuts[49] * 1000:6.2f} ms"
        f"   p99 {cuts[98] * 1000:6.2f} ms"
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--pool", type=int, default=8)
    options = parser.parse_args()
    with running_server() as server:
        dsn = server.socket_url()
        setup = await asyncpg.connect(dsn)

        async def fresh() -> None:
            await setup.execute(SCHEMA)

        # asyncpg, a pool, one statement per acknowledgement.
        await fresh()
        pool = await asyncpg.create_pool(dsn, min_size=options.pool, max_size=options.pool)

        async def asyncpg_accept(i: int) -> None:
            async with pool.acquire() as conn:
                await conn.fetch(ACCEPT, *_args(i))

        await _drive("asyncpg pool", asyncpg_accept, options.count, options.concurrency)

        # asyncpg, group commit: what one turn of the loop submits, pipelined in one transaction.
        await fresh()
        pending: list[tuple[tuple[object, ...], asyncio.Future[None]]] = []
        tasks: set[asyncio.Future[None]] = set()

        async def flush() -> None:
            group = pending[:]
            pending.clear()
            async with pool.acquire() as conn:
                await conn.fetchmany(ACCEPT, [args for args, _ in group])
            for _, future in group:
                future.set_result(None)

        def kick() -> None:
            tasks.add(asyncio.ensure_future(flush()))

        async def grouped_accept(i: int) -> None:
            future = asyncio.get_running_loop().create_future()
            if not pending:
                asyncio.get_running_loop().call_soon(kick)
            pending.append((_args(i), future))
            await future

        await _drive("asyncpg group commit", grouped_accept, options.count, options.concurrency)
        await pool.close()

        # psycopg 3, a pool, one statement per acknowledgement (autocommit: one round trip).
        await fresh()
        ppool = psycopg_pool.AsyncConnectionPool(
            dsn,
            min_size=options.pool,
            max_size=options.pool,
            kwargs={"autocommit": True, "prepare_threshold": 0},
            open=False,
        )
        await ppool.open()

        await _drive("psycopg pool", _psycopg(ppool), options.count, options.concurrency)
        await fresh()
        await _drive(
            "psycopg group commit", _psycopg_grouped(ppool), options.count, options.concurrency
        )
        await ppool.close()
        await setup.close()


def _psycopg(pool: psycopg_pool.AsyncConnectionPool) -> Callable[[int], Awaitable[None]]:
    query = _psycopg_query()

    async def accept(i: int) -> None:
        digest, now, sig, body, target = _args(i)
        async with pool.connection() as conn:
            cursor: psycopg.AsyncCursor[tuple[object, ...]] = await conn.execute(
                query, {"digest": digest, "now": now, "sig": sig, "body": body, "target": target}
            )
            await cursor.fetchall()

    return accept


def _psycopg_grouped(pool: psycopg_pool.AsyncConnectionPool) -> Callable[[int], Awaitable[None]]:
    query = _psycopg_query()
    pending: list[tuple[dict[str, object], asyncio.Future[None]]] = []
    tasks: set[asyncio.Future[None]] = set()

    async def flush() -> None:
        group = pending[:]
        pending.clear()
        async with pool.connection() as conn, conn.transaction(), conn.pipeline():
            cursors = [await conn.execute(query, args) for args, _ in group]
        for cursor in cursors:
            await cursor.fetchall()
        for _, future in group:
            future.set_result(None)

    def kick() -> None:
        tasks.add(asyncio.ensure_future(flush()))

    async def accept(i: int) -> None:
        future = asyncio.get_running_loop().create_future()
        if not pending:
            asyncio.get_running_loop().call_soon(kick)
        digest, now, sig, body, target = _args(i)
        args = {"digest": digest, "now": now, "sig": sig, "body": body, "target": target}
        pending.append((args, future))
        await future

    return accept


def _psycopg_query() -> str:
    """psycopg's placeholders are %s; $2, used twice, becomes a named one."""
    query = ACCEPT
    for n, name in ((1, "digest"), (2, "now"), (3, "sig"), (4, "body"), (5, "target")):
        query = query.replace(f"${n}", f"%({name})s")
    return query


if __name__ == "__main__":
    os.environ.setdefault("PGCONNECT_TIMEOUT", "5")
    asyncio.run(main())
