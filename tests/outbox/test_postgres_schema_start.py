"""A gateway's start while another session holds what the schema check needs, against a real
server: a table lock (a backup, an administrator), or the lock under which gateways create or
migrate the schema. The start ends within a bound, with a reason naming what it waited for, or
goes on once the lock is let go (gateway.outbox.postgres.schema)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from gateway.config import OutboxConfig
from gateway.errors import OutboxError
from gateway.outbox import open_outbox
from gateway.outbox.postgres.outbox import PostgresOutbox

# The schema lock's key (gateway.outbox.postgres.schema._CREATE_LOCK).
SCHEMA_LOCK = 0x77616261
# Longer than any bound the start keeps to (gateway.outbox.postgres.schema: 10 s for a table
# lock, 15 s for the schema lock), short of forever: a start still going then hangs.
WITHIN_S = 30.0
LOGGER = "gateway.outbox.postgres.schema"


@pytest.fixture
async def other(pg_url: str) -> AsyncIterator[asyncpg.Connection[Any]]:
    """Another client's session on the test's database, named like a backup; closed (so its
    locks let go) at the end."""
    conn = await asyncpg.connect(pg_url, server_settings={"application_name": "pg_dump"})
    try:
        yield conn
    finally:
        await conn.close()


async def _first_start(pg_url: str) -> None:
    box = await open_outbox(OutboxConfig(url=pg_url), dispatching=False)
    await box.close()


async def _start_fails(pg_url: str) -> str:
    """The OutboxError a start ends with, within WITHIN_S."""
    started = time.monotonic()
    try:
        box = await asyncio.wait_for(open_outbox(OutboxConfig(url=pg_url)), WITHIN_S)
    except OutboxError as exc:
        message = str(exc)
    else:
        await box.close()
        raise AssertionError("the start went on")
    assert time.monotonic() - started < WITHIN_S
    assert "\n" not in message
    return message


async def _version(conn: asyncpg.Connection[Any]) -> int:
    return int(await conn.fetchval("SELECT version FROM waba_gateway.meta"))


async def test_a_migration_behind_a_backup_fails_the_start_naming_the_backup(
    pg_url: str, other: asyncpg.Connection[Any]
) -> None:
    """pg_dump holds ACCESS SHARE on every table it dumps until it is done; the migration's
    DROP INDEX waits for ACCESS EXCLUSIVE on the deliveries. The start fails within the bound,
    naming the session and its lock, leaving the version as it was; once the dump is done, the
    next start migrates."""
    await _first_start(pg_url)
    await other.execute("UPDATE waba_gateway.meta SET version = 6")
    transaction = other.transaction()
    await transaction.start()
    await other.execute("LOCK TABLE waba_gateway.deliveries IN ACCESS SHARE MODE")
    message = await _start_fails(pg_url)
    assert "lock" in message
    assert "'pg_dump'" in message
    assert f"pid {other.get_server_pid()}" in message
    assert "waba_gateway.deliveries" in message
    await transaction.rollback()
    assert await _version(other) == 6
    await _first_start(pg_url)
    assert await _version(other) == 7


async def test_a_table_locked_exclusively_fails_the_start_naming_the_lock(
    pg_url: str, other: asyncpg.Connection[Any]
) -> None:
    """An administrator's LOCK TABLE ... IN ACCESS EXCLUSIVE MODE on the version table, left in
    an open transaction: reading the version waits for it, up to the bound."""
    await _first_start(pg_url)
    async with other.transaction():
        await other.execute("LOCK TABLE waba_gateway.meta IN ACCESS EXCLUSIVE MODE")
        message = await _start_fails(pg_url)
    assert "lock" in message
    assert "AccessExclusiveLock on waba_gateway.meta" in message
    assert f"pid {other.get_server_pid()}" in message
    await _first_start(pg_url)


async def test_the_schema_lock_held_elsewhere_fails_the_start_naming_its_holder(
    pg_url: str, other: asyncpg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A session keeps the lock under which gateways create the schema (a gateway cut off from
    the database mid-migration keeps it until the server ends its session): a start says at
    once, in the log, what it waits for, and fails within the bound; nothing is created."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    await other.execute("SELECT pg_advisory_lock($1)", SCHEMA_LOCK)
    message = await _start_fails(pg_url)
    assert "schema lock" in message
    assert f"pid {other.get_server_pid()}" in message
    assert "'pg_dump'" in message
    waits = [
        r.getMessage() for r in caplog.records if r.name == LOGGER and "waiting" in r.getMessage()
    ]
    assert len(waits) == 1, waits
    assert f"pid {other.get_server_pid()}" in waits[0]
    assert not await other.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'waba_gateway')"
    )


async def test_a_start_waiting_for_the_schema_lock_goes_on_once_it_is_let_go(
    pg_url: str, other: asyncpg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """The lock let go while a start waits for it: the start creates the schema and opens."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    await other.execute("SELECT pg_advisory_lock($1)", SCHEMA_LOCK)
    start = asyncio.create_task(open_outbox(OutboxConfig(url=pg_url)))
    deadline = time.monotonic() + WITHIN_S
    while not any("waiting" in r.getMessage() for r in caplog.records if r.name == LOGGER):
        assert not start.done(), start
        assert time.monotonic() < deadline, "no log line says the start waits"
        await asyncio.sleep(0.05)
    await other.execute("SELECT pg_advisory_unlock($1)", SCHEMA_LOCK)
    box = await asyncio.wait_for(start, WITHIN_S)
    try:
        assert isinstance(box, PostgresOutbox)
        assert await _version(other) == 7
    finally:
        await box.close()
