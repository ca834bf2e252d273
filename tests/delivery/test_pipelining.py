"""The dispatcher's batches: deliveries due together reach a target pipelined on one
connection, never more per connection than the target's ``pipeline`` and never more in flight
than its ``concurrency``.

The target is a raw HTTP/1.1 server that reads requests ahead of its answers (as a server
handling pipelined requests does) and answers each after a short delay, so it can count the
requests it holds unanswered, per connection and in all. Consecutive answers differ in their
status (2xx statuses in turn: of a delivered attempt the outbox keeps only the status), and each
delivery's recorded attempt must hold the status sent to its own request: a dispatcher that
paired answers with the wrong deliveries fails.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Unpack

import pytest
from helpers import TargetOptions, eventually, message_body, meta_signature, read_message

from gateway.config import DispatcherConfig, TargetConfig
from gateway.delivery.dispatcher import BATCH_BYTES, Dispatcher
from gateway.edge.routing import Route
from gateway.outbox.sqlite.outbox import SqliteOutbox

DELIVERIES = 6


# Success statuses taken in turn, so that no two consecutive answers are alike.
STATUSES = (200, 201, 202, 203, 206)


def _answer_for(delivery_id: bytes, status: int) -> bytes:
    """``status`` with the delivery's own id as the body."""
    body = b"answer to " + delivery_id
    return b"HTTP/1.1 %d OK\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)


def _delivery_id(head: bytes) -> bytes:
    (found,) = [
        line.split(b":", 1)[1].strip()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"x-gateway-delivery-id:")
    ]
    return found


class ReadAheadServer:
    """Reads every request as soon as it arrives; answers each, in order, 20 ms later.

    With ``hold_for`` set, no answer goes until that many requests are held unanswered at once
    (or ``HOLD_S`` has passed): a loaded machine may open the sixth connection more than 20 ms
    after the first, and the count of requests held together must not depend on that. A
    dispatcher that never sends ``hold_for`` at once still gets its answers, and fails on the
    count rather than hanging."""

    HOLD_S = 2.0

    def __init__(self) -> None:
        self.connections = 0
        self.answered = 0
        self.most_per_connection = 0
        self.most_in_all = 0
        self._unanswered = 0
        self.port = 0
        self.sent: dict[str, int] = {}  # delivery id -> the status its request was answered
        self.hold_for = 1
        self._held_enough = asyncio.Event()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        held: asyncio.Queue[bytes] = asyncio.Queue()
        unanswered = [0]  # on this connection
        answering = asyncio.create_task(self._answer(held, unanswered, writer))
        try:
            while True:
                head, _ = await read_message(reader)
                self._unanswered += 1
                unanswered[0] += 1
                held.put_nowait(_delivery_id(head))
                self.most_per_connection = max(self.most_per_connection, unanswered[0])
                self.most_in_all = max(self.most_in_all, self._unanswered)
                if self._unanswered >= self.hold_for:
                    self._held_enough.set()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            answering.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await answering
            writer.close()

    async def _answer(
        self, held: asyncio.Queue[bytes], unanswered: list[int], writer: asyncio.StreamWriter
    ) -> None:
        while True:
            delivery_id = await held.get()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._held_enough.wait(), self.HOLD_S)
            await asyncio.sleep(0.02)
            status = STATUSES[self.answered % len(STATUSES)]
            self.sent[delivery_id.decode()] = status
            writer.write(_answer_for(delivery_id, status))
            unanswered[0] -= 1
            self._unanswered -= 1
            self.answered += 1

    async def start(self) -> asyncio.Server:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        return server

    def target(self, **options: Unpack[TargetOptions]) -> TargetConfig:
        """A target named "t" on this server."""
        settings = TargetOptions(url=f"http://127.0.0.1:{self.port}/hook")
        settings.update(options)
        return TargetConfig(name="t", **settings)


@pytest.fixture
async def target_server() -> AsyncIterator[ReadAheadServer]:
    made = ReadAheadServer()
    server = await made.start()
    yield made
    server.close()
    await server.wait_closed()


async def deliver_all(
    tmp_path: Path, target_server: ReadAheadServer, target: TargetConfig, bodies: list[bytes]
) -> None:
    """Store ``bodies`` for ``target`` (all due at once), start a dispatcher, and wait until
    every one is delivered, each on its first attempt with the answer to its own request."""
    outbox = SqliteOutbox(tmp_path / "outbox.sqlite3", dedup_window_s=0)
    dispatcher = Dispatcher(outbox, [target], DispatcherConfig(), retention_s=3600)
    try:
        for body in bodies:
            await outbox.accept(body, meta_signature(body), [Route(target.name, None)], now=1.0)
        dispatcher.start()

        async def all_delivered() -> bool:
            return (await outbox.counts())["delivered"] == len(bodies)

        await eventually(all_delivered, f"{len(bodies)} deliveries delivered")
        delivered = await outbox.query(state="delivered")
        assert {d.attempts for d in delivered} == {1}
        for delivery in delivered:
            (attempt,) = await outbox.attempts(delivery.id)
            assert attempt.status == target_server.sent[delivery.id], "answers paired wrongly"
        assert target_server.answered == len(bodies)
    finally:
        await dispatcher.stop()
        await outbox.close()


@pytest.mark.parametrize(
    ("pipeline", "concurrency", "per_connection", "in_all"),
    [
        (16, 32, DELIVERIES, DELIVERIES),  # one batch, one connection, one write
        (1, 32, 1, DELIVERIES),  # no pipelining: a connection per delivery in flight
        (4, 32, 4, DELIVERIES),  # batches of at most 4
        (16, 2, 2, 2),  # concurrency bounds the batch as well
    ],
    ids=["pipelined", "pipeline-1", "pipeline-4", "concurrency-2"],
)
async def test_deliveries_due_together_are_pipelined_within_the_targets_limits(
    tmp_path: Path,
    target_server: ReadAheadServer,
    pipeline: int,
    concurrency: int,
    per_connection: int,
    in_all: int,
) -> None:
    """Six deliveries due at once, claimed together when the dispatcher starts: the target
    holds at most ``pipeline`` of them unanswered on one connection and ``concurrency`` in
    all, reaches those limits, and every delivery ends delivered on its first attempt."""
    target = target_server.target(pipeline=pipeline, concurrency=concurrency)
    target_server.hold_for = in_all
    bodies = [message_body(f"due together {n}") for n in range(DELIVERIES)]
    await deliver_all(tmp_path, target_server, target, bodies)
    assert target_server.most_per_connection == per_connection
    assert target_server.most_in_all == in_all


async def test_a_batch_holds_at_most_a_mebibyte_of_bodies(
    tmp_path: Path, target_server: ReadAheadServer
) -> None:
    """Four 400 KB notifications due together go as two batches of two (a third would pass
    BATCH_BYTES), and one body larger than BATCH_BYTES still goes, alone."""
    big = BATCH_BYTES * 4 // 10
    bodies = [bytes([ord("a") + n]) * big for n in range(4)]
    bodies.append(b"z" * (BATCH_BYTES + 1))
    await deliver_all(tmp_path, target_server, target_server.target(), bodies)
    assert target_server.most_per_connection == 2
