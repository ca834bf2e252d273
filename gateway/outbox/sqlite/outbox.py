"""The SQLite outbox: every acknowledged notification, kept in one file until it is delivered.

Rule: a notification is acknowledged only after the transaction that stores it and its deliveries
has committed with ``synchronous=FULL`` in WAL mode, so a power cut after the 200 loses nothing.

This is the asynchronous face of the file: :mod:`gateway.outbox.sqlite.layout` holds the file's
layout, :mod:`gateway.outbox.sqlite.store` the SQL, :mod:`gateway.outbox.sqlite.writer` the thread
that runs it in group commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Collection, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import TypeVar

from gateway.errors import OutboxError
from gateway.outbox.interface import Settles
from gateway.outbox.model import (
    AttemptRecord,
    AttemptResult,
    Backlog,
    Delivery,
    Outcome,
    Route,
    Size,
    State,
)
from gateway.outbox.rows import delivery_id_of, rowid_of, stored_outcome
from gateway.outbox.sqlite import conversations, history, layout, store
from gateway.outbox.sqlite.lineup import Lineup
from gateway.outbox.sqlite.replays import ReplayBell, announce
from gateway.outbox.sqlite.writer import LAZY_WAIT_S, PATIENT_WAIT_S, Writer

__all__ = ["SqliteOutbox"]

T = TypeVar("T")


def _same(deliveries: list[Delivery] | None) -> list[Delivery] | None:
    return deliveries


log = logging.getLogger(__name__)


class SqliteOutbox:
    """The :class:`~gateway.outbox.interface.Outbox` on a SQLite file, through one
    group-committing writer thread."""

    def __init__(
        self,
        path: Path,
        *,
        dedup_window_s: float,
        busy_timeout_s: float = 5.0,
        on_commit: Callable[[int], None] | None = None,
        create: bool = True,
        on_replay: Callable[[str | None], None] | None = None,
    ) -> None:
        """``on_commit``: called on the writer thread with the size of each group committed (a
        job run again alone after its group failed is not counted). ``create=False``: refuse
        a path with no outbox file yet (the command line reads an outbox, never makes one).
        ``on_replay``: this process holds the file (its gateway) and hears the replays another
        process makes on it (:mod:`gateway.outbox.sqlite.replays`): the id, ``None`` for many;
        without it, this process's own replays are announced to whoever holds the file."""
        if not create and not path.exists():
            raise OutboxError(f"outbox.path = '{path}': no outbox file there yet")
        self.path = path
        self.dedup_window_s = dedup_window_s
        self._busy_timeout_s = busy_timeout_s
        self._prefix = ""
        # The last notification id the prune walk has passed (see prune). Kept in memory: after
        # a restart the first prune walks from the oldest row again, which is only slower.
        self._prune_after = 0
        self._writer = Writer(path, self._open, on_commit, busy_timeout_s)
        # The ordered targets' conversations, for this process's claims (its dispatcher's).
        self._lineup = Lineup()
        # Made now that the writer has opened (or made) the file: named after it.
        self._bell = None if on_replay is None else ReplayBell(path, on_replay)

    def _open(self, path: Path) -> sqlite3.Connection:
        # On the writer thread, before the constructor returns.
        conn, self._prefix = layout.open_store(path, self._busy_timeout_s)
        return conn

    async def run(
        self,
        func: Callable[[sqlite3.Connection], T],
        *,
        durable: bool = True,
        read: bool = False,
        committed: bool = False,
    ) -> T:
        """Run ``func`` (given the connection) in the next group transaction; return its result
        once that has committed. ``read``: ``func`` writes nothing (alone, it needs no write
        transaction); ``committed``: it reads only what is committed (see
        :meth:`Writer.submit`). For this backend's own operations and tests: the rest of the
        gateway uses the interface's operations only."""
        result: T = await self._writer.submit(func, durable=durable, read=read, committed=committed)
        return result

    async def close(self) -> None:
        """Finish the jobs already queued, then close the connection."""
        if self._bell is not None:
            self._bell.close()
        await self._writer.close()

    # -- operations --------------------------------------------------------------------------

    async def accept(
        self,
        body: bytes,
        signature: str,
        routes: Sequence[Route],
        now: float,
        trace: str | None = None,
    ) -> list[Delivery] | None:
        """Store a verified notification and its deliveries; return the deliveries (so the
        dispatcher can start them without reading them back). ``None``: an identical body was
        already received inside the deduplication window, and nothing new is stored."""
        return await self.accept_soon(body, signature, routes, now, trace, then=_same)

    def accept_soon(
        self,
        body: bytes,
        signature: str,
        routes: Sequence[Route],
        now: float,
        trace: str | None = None,
        *,
        then: Callable[[list[Delivery] | None], T],
    ) -> asyncio.Future[T]:
        """:meth:`accept` as the future of ``then(its result)``, called on the event loop's
        thread once the group holding it has committed: the listener's ack path waits for it
        without a task and three coroutines per request (see
        :meth:`gateway.edge.callback.Callback.notify_soon`)."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self.accept_into(body, signature, routes, now, trace, then=then, into=future)
        return future

    def accept_into(
        self,
        body: bytes,
        signature: str,
        routes: Sequence[Route],
        now: float,
        trace: str | None = None,
        *,
        then: Callable[[list[Delivery] | None], T],
        into: Settles[T],
    ) -> None:
        """:meth:`accept_soon`, settling ``into`` (the listener's answer, given at once rather
        than at the loop's next turn, as a future's done callback would be)."""
        # Closures called with positional arguments: on every request, a partial's keyword
        # arguments would be merged into a new dict at each call.
        digest = hashlib.sha256(body).digest()
        since = now - self.dedup_window_s
        insert = store.insert_notification
        deliveries = self._deliveries
        lineup = self._lineup

        def job(conn: sqlite3.Connection) -> tuple[int, list[int], list[int]] | None:
            return insert(conn, digest, since, now, signature, body, routes, trace, lineup)

        def made(row: tuple[int, list[int], list[int]] | None) -> T:
            return then(deliveries(body, signature, routes, now, trace, row))

        self._writer.submit_into(job, into, after=made)

    def _deliveries(
        self,
        body: bytes,
        signature: str,
        routes: Sequence[Route],
        now: float,
        trace: str | None,
        stored: tuple[int, list[int], list[int]] | None,
    ) -> list[Delivery] | None:
        """The deliveries :func:`store.insert_notification` stored (``None``: a duplicate).
        Built on the event loop's thread after the commit rather than in the job: the job runs
        under the write lock that the other worker processes wait for."""
        if stored is None:
            return None
        notification_id, rowids, behind = stored
        return Delivery.fresh(
            [delivery_id_of(self._prefix, rowid) for rowid in rowids],
            routes,
            notification_id=notification_id,
            body=body,
            signature=signature,
            now=now,
            behind=[delivery_id_of(self._prefix, rowid) for rowid in behind],
            trace=trace,
        )

    def lines_up(self) -> bool:
        """One dispatcher per file: its claims find each ordered target's first deliveries in
        memory (:mod:`gateway.outbox.sqlite.lineup`)."""
        return True

    async def take_tokens(
        self, target: str, rate_per_s: float, burst: int, want: int
    ) -> int | None:
        # One gateway per file and one dispatcher per gateway: the dispatcher keeps the bucket.
        return None

    async def give_back_tokens(
        self, target: str, rate_per_s: float, burst: int, count: int
    ) -> None:
        return None

    async def due(
        self,
        now: float,
        limits: Mapping[str, int],
        exclude: Collection[str] = (),
        ordered: Collection[str] = (),
        conversations: Mapping[str, Collection[str]] | None = None,
        runs: Mapping[str, int] | None = None,
        more: MutableMapping[str, Collection[str]] | None = None,
    ) -> list[Delivery]:
        """Pending deliveries whose time has come, oldest first: at most ``limits[target]`` for
        each target named there, leaving out the ids in ``exclude`` (in flight). An ordered
        target's come from the conversations held in memory (:mod:`.lineup`), which ask no
        ``conversations`` to be named and give no ``runs`` and no ``more``. A delivery whose
        body no longer matches its stored digest is dead-lettered, never handed out."""
        # Copies: the caller's collections may change before the writer thread reads them.
        found, damaged = await self.run(
            functools.partial(
                store.due_deliveries,
                prefix=self._prefix,
                now=now,
                limits=dict(limits),
                skip=frozenset(exclude),
                ordered=frozenset(ordered),
                lineup=self._lineup,
            ),
            read=True,
            # The lineup takes in what it reads for good: never a row that is not committed.
            committed=True,
        )
        await self._dead_letter_damaged(damaged, now)
        return found

    async def following(
        self, now: float, target: str, after: Mapping[str, str], length: int
    ) -> dict[str, list[Delivery]]:
        """None: claims hand out no runs (see :meth:`due`)."""
        return {}

    async def _dead_letter_damaged(self, rowids: Sequence[int], now: float) -> None:
        if not rowids:
            return
        await self.run(functools.partial(store.dead_letter_damaged, rowids=rowids, now=now))
        self._lineup.ended((rowid, None) for rowid in rowids)
        for rowid in rowids:
            log.error(
                "delivery %s dead-lettered: %s", delivery_id_of(self._prefix, rowid), store.DAMAGED
            )

    async def backlog(self) -> list[Backlog]:
        """Pending deliveries and dead letters per target. Read in a lazy job (it rides along
        with the next commit): a scrape never adds an fsync."""
        return await self.run(store.backlog, read=True)

    async def record(
        self, delivery_id: str, outcome: Outcome, result: AttemptResult, now: float
    ) -> None:
        """Store the outcome of one attempt (see :meth:`record_many`)."""
        await self.record_many([(delivery_id, outcome, result)], now)

    async def record_many(
        self,
        attempts: Sequence[tuple[str, Outcome, AttemptResult]],
        now: float,
        created: Mapping[str, float] | None = None,
        patient: bool = False,
    ) -> None:
        """Store the outcomes of attempts that ended at ``now``, as one job. Lazily (see
        :mod:`gateway.outbox.sqlite.writer`): lost in a power cut, an outcome only means the
        delivery is attempted again. ``created``: see the interface (a replay stands);
        ``patient``: it waits longer for company in a commit."""
        since = created or {}
        updates = [self._attempt(*attempt, now, since.get(attempt[0])) for attempt in attempts]
        record = store.record_attempts

        def job(conn: sqlite3.Connection) -> None:
            record(conn, updates)

        # Submitted here rather than through run(): one coroutine less on every batch's outcomes.
        wait_s = PATIENT_WAIT_S if patient else LAZY_WAIT_S
        await self._writer.submit(job, durable=False, wait_s=wait_s)
        # Committed: the next claim hands out what follows each one that ended.
        self._lineup.ended(
            (a.rowid, a.next_attempt_at if a.state == "pending" else None)
            for a in updates
            if a.rowid is not None
        )

    def _attempt(
        self,
        delivery_id: str,
        outcome: Outcome,
        result: AttemptResult,
        now: float,
        created_at: float | None = None,
    ) -> store.Attempt:
        state, next_at, error, held = stored_outcome(outcome, now)
        return store.Attempt(
            rowid=rowid_of(delivery_id, self._prefix),
            state=state,
            next_attempt_at=next_at,
            now=now,
            status=result.status,
            error=error,
            response=result.response_excerpt,
            held_s=held,
            created_at=created_at,
        )

    async def size(self) -> Size:
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):  # no log file between checkpoints is no error
                total += os.stat(f"{self.path}{suffix}").st_size
        return Size(bytes=total)

    async def held_back(self, targets: Collection[str]) -> dict[str, int]:
        wanted = tuple(targets)
        if not wanted:
            return {}
        lineup = self._lineup

        def count(conn: sqlite3.Connection) -> dict[str, int]:
            # The dispatcher's lineup knows without a pass over every pending delivery.
            held = lineup.held_back(wanted)
            rest = tuple(name for name in wanted if name not in held)
            return held | conversations.held_back(conn, rest) if rest else held

        return await self.run(count, read=True)

    async def ping(self) -> None:
        """Through the writer, in a write transaction: it takes the write lock a notification's
        commit takes. After a failed write (a full disk lets an empty transaction commit) the
        ping writes for real, so the outbox is ready again only once a write commits."""
        writer = self._writer

        def probe(conn: sqlite3.Connection) -> None:
            if writer.failure is not None:
                store.touch(conn)
            else:
                conn.execute("SELECT 1").fetchone()

        if writer.failure is not None and writer.lost:
            raise OutboxError(writer.failure)
        await self.run(probe)

    async def query(
        self,
        *,
        state: State | None = None,
        target: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Delivery]:
        prefix = self._prefix
        return await self.run(
            lambda conn: store.list_deliveries(conn, state, target, limit, prefix, offset),
            read=True,
        )

    async def get(self, delivery_id: str) -> Delivery | None:
        prefix = self._prefix
        return await self.run(
            lambda conn: history.get_delivery(conn, delivery_id, prefix), read=True
        )

    async def attempts(self, delivery_id: str) -> list[AttemptRecord]:
        prefix = self._prefix
        return await self.run(
            lambda conn: history.attempt_history(conn, delivery_id, prefix), read=True
        )

    async def replay(self, delivery_id: str, now: float) -> bool:
        """Make a delivery pending again, due now, with a fresh attempt count and age. False
        when no delivery of this outbox has that id (including ids of other outboxes)."""
        prefix = self._prefix
        found = await self.run(lambda conn: store.replay_delivery(conn, delivery_id, now, prefix))
        if found and self._bell is None:
            announce(self.path, delivery_id)
        return found

    async def replay_many(
        self, *, state: State, target: str | None, since: float | None, now: float
    ) -> int:
        count = await self.run(
            functools.partial(
                store.replay_deliveries, state=state, target=target, since=since, now=now
            )
        )
        if count and state == "pending" and self._bell is None:
            announce(self.path, None)
        return count

    async def _in_steps(
        self, step: Callable[[sqlite3.Connection], int], *, stops: str | None = None
    ) -> int:
        """Run ``step``, a job that removes at most ``store.PRUNE_BATCH`` rows, until it removes
        fewer; how many it removed in all. Each step is its own job: requests committing
        meanwhile wait for one step, not for the whole backlog.

        ``stops``: what the steps remove, for a caller that reports the count. A step that fails
        after others have removed rows then ends the loop with their count, the failure logged:
        the steps before it have committed, and raised, their count was lost, so the rows they
        removed went unreported. A failure before anything was removed is raised."""
        removed = 0
        while True:
            try:
                count = await self.run(step)
            except OutboxError as exc:
                if stops is None or not removed:
                    raise
                log.warning("stopped removing %s after %d: %s", stops, removed, exc)
                return removed
            removed += count
            if count < store.PRUNE_BATCH:
                return removed

    async def purge_dead(self, before: float, now: float | None = None) -> int:
        """In steps (:meth:`_in_steps`), as :meth:`prune`: requests committing meanwhile wait
        for one step, not for a month of dead letters. A step that fails after others have
        removed dead letters ends the purge with their count (the caller's warning and counter
        say what went); the next purge removes the rest."""
        horizon = (time.time() if now is None else now) - self.dedup_window_s
        return await self._in_steps(
            functools.partial(store.purge_dead, before=before, horizon=horizon),
            stops="expired dead letters",
        )

    async def delivered_targets(self) -> list[str]:
        return await self.run(store.delivered_targets, read=True)

    async def prune(self, now: float, retention_s: float, targets: Collection[str]) -> int:
        """Remove ``targets``' delivered rows older than the retention, and notifications older
        than the retention and the deduplication window that have no deliveries left; dead
        letters and pending deliveries stay. Returns the number of delivered rows removed.

        Works in steps of a bounded number of rows, each its own job (:meth:`_in_steps` for
        the delivered rows; the walk over notifications likewise): requests committing
        meanwhile wait for one step, not for the whole backlog.
        """
        horizon = now - max(retention_s, self.dedup_window_s)
        removed = 0
        for name in tuple(targets):
            removed += await self._in_steps(
                functools.partial(
                    store.prune_delivered,
                    target=name,
                    before=now - retention_s,
                    horizon=horizon,
                    walked=self._prune_after,
                )
            )
        while True:
            walk = functools.partial(
                store.prune_notifications, after=self._prune_after, horizon=horizon
            )
            # The position is kept only once the step has committed: a step that is rolled
            # back (and run again alone) must not have moved it.
            self._prune_after, done = await self.run(walk)
            if done:
                return removed

    async def counts(self) -> dict[str, int]:
        return await self.run(store.count_states, read=True)
