"""Reloads against the dispatcher's lanes: a target removed and configured again keeps its
deliveries and its limits, however the reload falls among its claims and batches."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import eventually, message_body, meta_signature, sink_target
from sink import Hang, Sink

from gateway.config import DispatcherConfig
from gateway.delivery.dispatcher import Dispatcher
from gateway.outbox import Delivery, Route
from gateway.outbox.sqlite.outbox import SqliteOutbox


class ReloadedWhileClaiming(SqliteOutbox):
    """The real SQLite outbox; ``during_claim`` runs once, as the first claim's query
    returns: a reload that lands while the dispatcher waits for the outbox."""

    during_claim: Callable[[], None] | None = None

    async def due(self, *args: Any, **kwargs: Any) -> list[Delivery]:
        # Passed on whole: the claim is the real outbox's, whatever it is asked.
        found = await super().due(*args, **kwargs)
        reload, self.during_claim = self.during_claim, None
        if reload is not None:
            reload()
        return found


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[ReloadedWhileClaiming]:
    made = ReloadedWhileClaiming(tmp_path / "outbox.sqlite3", dedup_window_s=0)
    yield made
    await made.close()


async def _store(outbox: SqliteOutbox, text: str) -> list[Delivery]:
    body = message_body(text)
    return await outbox.accept(body, meta_signature(body), [Route("sink", None)], now=1.0) or []


async def test_a_target_removed_while_its_claim_runs_gets_the_delivery_once_back(
    outbox: ReloadedWhileClaiming, sink: Sink
) -> None:
    """The claim's delivery of a target removed meanwhile stays pending, and goes out when
    the target is configured again (it is not left marked as started)."""
    target = sink_target(sink)
    await _store(outbox, "claimed during a reload")
    dispatcher = Dispatcher(outbox, [target], DispatcherConfig(), retention_s=3600)
    reloaded = asyncio.Event()

    def remove() -> None:
        dispatcher.reconfigure([], DispatcherConfig())
        reloaded.set()

    outbox.during_claim = remove
    dispatcher.start()
    try:
        await asyncio.wait_for(reloaded.wait(), 5)
        assert sink.received == []
        dispatcher.reconfigure([target], DispatcherConfig())
        (received,) = await sink.wait_for(1)
        assert b"claimed during a reload" in received.body
    finally:
        await dispatcher.stop()


async def test_a_target_configured_again_before_its_batch_ends_keeps_its_concurrency(
    outbox: ReloadedWhileClaiming, sink: Sink
) -> None:
    """With ``concurrency = 1``, a target removed and configured again while its one request
    is out sends nothing more until that request is answered: the batch still counts. The
    request ends delivered at its first attempt: its sender, retired by the reload, is closed
    only after it."""
    target = sink_target(sink, concurrency=1, pipeline=1)
    sink.script(Hang(1.0))
    dispatcher = Dispatcher(outbox, [target], DispatcherConfig(), retention_s=3600)
    dispatcher.start()
    try:
        (held,) = await _store(outbox, "first")
        dispatcher.offer([held])
        await sink.wait_for(1)
        dispatcher.reconfigure([], DispatcherConfig())
        dispatcher.reconfigure([target], DispatcherConfig())
        dispatcher.offer(await _store(outbox, "second"))
        first, second = await sink.wait_for(2)
        # The first was held for a second: the second may only have left after its answer.
        assert second.at - first.at >= 0.9

        async def delivered() -> bool:
            found = await outbox.get(held.id)
            return found is not None and found.state == "delivered"

        await eventually(delivered, "the held delivery delivered")
        assert [a.status for a in await outbox.attempts(held.id)] == [200]
    finally:
        await dispatcher.stop()


class EndedWhileClaiming(SqliteOutbox):
    """The real SQLite outbox; the first claim that finds ``watched`` due lets ``during_claim``
    start it elsewhere and returns only once its outcome is recorded: the stale answer of a
    query read just before that outcome committed."""

    watched: str | None = None
    during_claim: Callable[[], None] | None = None
    answered: asyncio.Event | None = None

    async def due(self, *args: Any, **kwargs: Any) -> list[Delivery]:
        # Passed on whole: the claim is the real outbox's, whatever it is asked.
        found = await super().due(*args, **kwargs)
        start, self.during_claim = self.during_claim, None
        if start is not None and any(d.id == self.watched for d in found):
            start()

            async def recorded() -> bool:
                done = await self.get(self.watched or "")
                return done is not None and done.state == "delivered"

            await eventually(recorded, "the watched delivery recorded while the claim runs")
            if self.answered is not None:
                self.answered.set()
        return found


async def test_a_delivery_recorded_while_a_claim_runs_is_not_started_again(
    tmp_path: Path, sink: Sink
) -> None:
    """A claim that read a delivery as due just before its outcome was recorded does not send
    it a second time: the target receives it once, with one attempt recorded."""
    outbox = EndedWhileClaiming(tmp_path / "outbox.sqlite3", dedup_window_s=0)
    try:
        (stored,) = await _store(outbox, "ended while claiming")
        dispatcher = Dispatcher(outbox, [sink_target(sink)], DispatcherConfig(), retention_s=3600)
        outbox.watched = stored.id
        outbox.during_claim = lambda: dispatcher.offer([stored])
        outbox.answered = asyncio.Event()
        dispatcher.start()
        try:
            await sink.wait_for(1)
            await asyncio.wait_for(outbox.answered.wait(), 10)
            await asyncio.sleep(0.3)  # room for a second send, which must not come
            assert len(sink.received) == 1
            assert [a.status for a in await outbox.attempts(stored.id)] == [200]
        finally:
            await dispatcher.stop()
    finally:
        await outbox.close()
