"""The dispatcher against a target's circuit breaker: once a target fails, what it still has
queued waits for the breaker's probes, on a real HTTP target and a real SQLite outbox, with the
dispatcher's clock in the test's hands."""

from __future__ import annotations

import asyncio
from pathlib import Path

from helpers import eventually, message_body, meta_signature, sink_target
from sink import Reply, Sink

from gateway.config import DispatcherConfig
from gateway.delivery.dispatcher import Dispatcher
from gateway.outbox import Delivery, Route
from gateway.outbox.sqlite.outbox import SqliteOutbox

_START = 1000.0


class _Clock:
    """The dispatcher's time: still until the test moves it."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_a_target_that_asks_to_wait_gets_nothing_queued_for_it_until_its_retry_after(
    tmp_path: Path, sink: Sink
) -> None:
    """With ``concurrency = 1`` four deliveries start together: one goes, three wait in the
    target's queue. The target answers 503 with ``Retry-After: 60``: the three are not sent
    while it asked to wait (nor do they spend an attempt on it); once the clock passes the
    pause, the breaker's probe and then the rest deliver every one."""
    outbox = SqliteOutbox(tmp_path / "outbox.sqlite3", dedup_window_s=0)
    clock = _Clock(_START)
    waiting = Reply(status=503, headers={"Retry-After": "60"})
    sink.default = waiting
    target = sink_target(sink, concurrency=1, pipeline=1)
    dispatcher = Dispatcher(outbox, [target], DispatcherConfig(), retention_s=3600, clock=clock)
    try:
        stored = [await _store(outbox, f"queued {n}") for n in range(4)]
        dispatcher.start()
        dispatcher.offer(stored)
        await sink.wait_for(1)
        await asyncio.sleep(0.5)  # room for the queued three, which must not go
        assert len(sink.received) == 1

        sink.default = Reply()
        clock.now = _START + 61
        dispatcher.wake()

        async def all_delivered() -> bool:
            found = [await outbox.get(d.id) for d in stored]
            return all(d is not None and d.state == "delivered" for d in found)

        await eventually(all_delivered, "every delivery delivered after the pause")
        statuses = [[a.status for a in await outbox.attempts(d.id)] for d in stored]
        assert statuses == [[503, 200], [200], [200], [200]]
    finally:
        await dispatcher.stop()
        await outbox.close()


async def _store(outbox: SqliteOutbox, text: str) -> Delivery:
    body = message_body(text)
    (stored,) = (
        await outbox.accept(body, meta_signature(body), [Route("sink", None)], now=_START) or []
    )
    return stored
