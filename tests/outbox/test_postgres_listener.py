"""The PostgreSQL outbox's listener (gateway.outbox.postgres.listener) against a real server:
a connection that cannot listen is not left open, and a connection lost, whether the server
says so or goes silent, is replaced and the next announcement heard."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from gateway.outbox.postgres.listener import Listener
from gateway.outbox.postgres.sql import CHANNEL

Connect = Callable[[], Any]


@pytest.fixture
async def listening() -> AsyncIterator[Callable[..., Listener]]:
    """Starts listeners; all are closed at the end."""
    started: list[Listener] = []

    def start(
        connect: Connect,
        on_wake: Callable[[], None],
        *,
        timeout_s: float = 2.0,
        check_s: float | None = None,
    ) -> Listener:
        if check_s is None:  # the listener's own
            listener = Listener(connect, on_wake, timeout_s=timeout_s)
        else:
            listener = Listener(connect, on_wake, timeout_s=timeout_s, check_s=check_s)
        listener.start()
        started.append(listener)
        return listener

    yield start
    for listener in started:
        await listener.close()


async def _announce(pg_url: str) -> None:
    """What a gateway that stores unleased deliveries sends."""
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(f"NOTIFY {CHANNEL}, ''")
    finally:
        await conn.close()


async def _until_heard(pg_url: str, woken: asyncio.Event) -> None:
    """Announce until the listener hears it: an announcement before it listens is heard by no
    one."""
    while True:
        await _announce(pg_url)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(woken.wait(), 0.2)
            return


def _keeping(
    pg_url: str, opened: list[asyncpg.Connection[Any]]
) -> Callable[[], Awaitable[asyncpg.Connection[Any]]]:
    """A listener's ``connect`` that keeps each connection it opens in ``opened``."""

    async def connect() -> asyncpg.Connection[Any]:
        conn = await asyncpg.connect(pg_url)
        opened.append(conn)
        return conn

    return connect


async def _sessions(pg_url: str, pids: list[int]) -> list[int]:
    """Which of ``pids`` are server sessions still there, a few seconds on (a session ends
    a moment after its client closed it)."""
    conn = await asyncpg.connect(pg_url)
    try:
        for _ in range(50):
            rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE pid = ANY($1)", pids)
            if not rows:
                break
            await asyncio.sleep(0.1)
    finally:
        await conn.close()
    return sorted(row[0] for row in rows)


async def test_a_connection_that_cannot_listen_is_closed_before_the_listener_tries_again(
    pg_url: str, listening: Callable[..., Listener]
) -> None:
    """The listener connects, and then LISTEN fails (here: the session is in a failed
    transaction, so the server refuses it): that connection is closed, its server session
    ended, before the next try, which listens and hears the next announcement. Left open, each
    try kept a server session until the server refused every connection."""
    refused: list[asyncpg.Connection[Any]] = []

    async def connect() -> asyncpg.Connection[Any]:
        conn = await asyncpg.connect(pg_url)
        if len(refused) < 2:
            refused.append(conn)
            await conn.execute("BEGIN")
            with contextlib.suppress(asyncpg.DivisionByZeroError):
                await conn.execute("SELECT 1 / 0")
        return conn

    woken = asyncio.Event()
    listening(connect, woken.set)
    await _until_heard(pg_url, woken)  # the third try listens
    assert len(refused) == 2
    assert all(conn.is_closed() for conn in refused)
    pids = [conn.get_server_pid() for conn in refused]
    assert await _sessions(pg_url, pids) == []


async def test_a_listener_whose_connection_the_server_ends_connects_again_and_hears_the_next(
    pg_url: str, listening: Callable[..., Listener]
) -> None:
    """The server ends the listener's session (``pg_terminate_backend``, as a restart or an
    operator does): the listener connects again within seconds, wakes its dispatcher for what
    it may have missed, and hears the next announcement."""
    opened: list[asyncpg.Connection[Any]] = []
    connect = _keeping(pg_url, opened)

    woken = asyncio.Event()
    listening(connect, woken.set)
    await _until_heard(pg_url, woken)
    woken.clear()
    admin = await asyncpg.connect(pg_url)
    try:
        assert await admin.fetchval(
            "SELECT pg_terminate_backend($1, 5000)", opened[0].get_server_pid()
        )
    finally:
        await admin.close()
    await asyncio.wait_for(woken.wait(), 10.0)  # connected again: the dispatcher looks
    assert len(opened) == 2
    woken.clear()
    await _announce(pg_url)
    await asyncio.wait_for(woken.wait(), 5.0)


async def test_a_listener_whose_connection_goes_silent_connects_again_and_hears_the_next(
    pg_url: str, listening: Callable[..., Listener]
) -> None:
    """The listener's connection goes silent, with no word that it is lost (here its server
    process is stopped, as a server that hangs, or a NAT that forgot the connection, where no
    packet comes back either): the listener's check gets no answer, and it connects again,
    wakes its dispatcher and hears the next announcement, within a check and a timeout. A
    listener that only waited never noticed, and heard nothing more until the gateway
    restarted."""
    opened: list[asyncpg.Connection[Any]] = []
    connect = _keeping(pg_url, opened)

    woken = asyncio.Event()
    listening(connect, woken.set, check_s=0.5, timeout_s=1.0)
    await _until_heard(pg_url, woken)
    woken.clear()
    silent = opened[0].get_server_pid()
    os.kill(silent, signal.SIGSTOP)
    try:
        await asyncio.wait_for(woken.wait(), 10.0)  # connected again: the dispatcher looks
        assert len(opened) == 2
        assert opened[0].is_closed()
        woken.clear()
        await _announce(pg_url)
        await asyncio.wait_for(woken.wait(), 5.0)
    finally:
        os.kill(silent, signal.SIGCONT)
