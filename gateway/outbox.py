"""The outbox: a SQLite file that holds every acknowledged notification until it is delivered.

Rule: a notification is acknowledged only after the transaction that stores it and its deliveries
has committed with ``synchronous=FULL`` in WAL mode, so a power cut after the 200 loses nothing.

One writer thread owns the connection. Requests hand it jobs; it runs every job that is waiting
in one transaction (group commit), each inside its own savepoint so one failing job cannot spoil
the others, commits once, and only then answers each job. Concurrent requests thus share the cost
of one fsync, yet each is answered only after its own data is on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import queue as stdqueue
import secrets
import sqlite3
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from gateway.errors import OutboxError
from gateway.outcome import AttemptResult, DeadLetter, Delivered, Outcome, RetryAt
from gateway.routing import Route

__all__ = ["STATES", "Delivery", "Outbox"]

T = TypeVar("T")
STATES = ("pending", "delivered", "dead")
_MAX_BATCH = 512
_EXCERPT_CHARS = 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS notifications (
    id INTEGER PRIMARY KEY,
    digest BLOB NOT NULL,
    received_at REAL NOT NULL,
    signature TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS notifications_digest ON notifications (digest, received_at);
CREATE INDEX IF NOT EXISTS notifications_received ON notifications (received_at);
CREATE TABLE IF NOT EXISTS deliveries (
    id TEXT PRIMARY KEY,
    notification_id INTEGER NOT NULL REFERENCES notifications (id),
    target TEXT NOT NULL,
    body BLOB,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    last_status INTEGER,
    last_error TEXT,
    last_response TEXT
);
-- Claims read each target's due deliveries in time order; pruning finds old delivered rows.
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, target, next_attempt_at);
-- Pruning asks "does this notification still have deliveries?": without this index that is a
-- scan of every delivery for every old notification.
CREATE INDEX IF NOT EXISTS deliveries_notification ON deliveries (notification_id);
"""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One request owed to one target. ``body`` is what to send; ``signature`` is Meta's."""

    id: str
    notification_id: int
    target: str
    body: bytes
    signature: str
    split: bool
    state: str
    attempts: int
    created_at: float
    next_attempt_at: float
    received_at: float
    last_status: int | None = None
    last_error: str | None = None
    last_response: str | None = None

    def summary(self) -> dict[str, Any]:
        """What the admin API and CLI show: never the body (it holds message text)."""
        return {
            "id": self.id,
            "target": self.target,
            "state": self.state,
            "attempts": self.attempts,
            "received_at": self.received_at,
            "created_at": self.created_at,
            "next_attempt_at": self.next_attempt_at,
            "last_status": self.last_status,
            "last_error": self.last_error,
            "last_response": self.last_response,
            "bytes": len(self.body),
        }


_DELIVERY_COLUMNS = """d.id, d.notification_id, d.target, COALESCE(d.body, n.body), n.signature,
    d.body IS NOT NULL, d.state, d.attempts, d.created_at, d.next_attempt_at, n.received_at,
    d.last_status, d.last_error, d.last_response"""


def _delivery(row: tuple[Any, ...]) -> Delivery:
    return Delivery(
        id=row[0],
        notification_id=row[1],
        target=row[2],
        body=bytes(row[3]),
        signature=row[4],
        split=bool(row[5]),
        state=row[6],
        attempts=row[7],
        created_at=row[8],
        next_attempt_at=row[9],
        received_at=row[10],
        last_status=row[11],
        last_error=row[12],
        last_response=row[13],
    )


def connect(path: Path) -> sqlite3.Connection:
    """Open ``path`` with the durability settings the outbox promises."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is synced at every commit, so a committed notification survives power
        # loss; NORMAL would only survive a process crash.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.executescript(_SCHEMA)
    except (OSError, sqlite3.Error) as exc:
        raise OutboxError(f"outbox.path = '{path}': cannot open: {exc}") from exc
    return conn


class _Job:
    __slots__ = ("func", "future", "loop")

    def __init__(
        self,
        func: Callable[[sqlite3.Connection], Any],
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
    ) -> None:
        self.func = func
        self.loop = loop
        self.future = future


def _resolve_all(items: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, result, error in items:
        if future.done():  # the awaiting request was cancelled (client went away)
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


def _transaction(conn: sqlite3.Connection, jobs: Sequence[_Job], lock: int) -> list[Any]:
    """Run ``jobs`` in one transaction and commit; on any error roll back and raise.

    Worker processes sharing the outbox queue on an flock of ``lock`` first. SQLite's own
    busy handler would do, but it sleeps 1, 2, 5, 10... ms between tries, so two processes
    writing at full speed spend their time asleep; the kernel lock wakes the next writer as
    soon as the previous one commits.
    """
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            values = [job.func(conn) for job in jobs]
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
    return values


def _alone(conn: sqlite3.Connection, job: _Job, lock: int) -> tuple[Any, BaseException | None]:
    try:
        return _transaction(conn, [job], lock)[0], None
    except Exception as exc:
        return None, OutboxError(f"outbox write failed: {exc}")


class Outbox:
    """Asynchronous access to the outbox file through one group-committing writer thread."""

    def __init__(self, path: Path, *, dedup_window_s: float) -> None:
        self.path = path
        self.dedup_window_s = dedup_window_s
        self._jobs: stdqueue.SimpleQueue[_Job | None] = stdqueue.SimpleQueue()
        self._closing = False
        # sqlite3 connections belong to the thread that made them: the writer opens its own and
        # reports back whether that worked, so a bad path fails here, at start-up.
        opened: stdqueue.SimpleQueue[BaseException | None] = stdqueue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._run, args=(opened,), name="outbox-writer", daemon=True
        )
        self._thread.start()
        failure = opened.get()
        if failure is not None:
            raise failure

    # -- the writer thread -------------------------------------------------------------------

    def _run(self, opened: stdqueue.SimpleQueue[BaseException | None]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            opened.put(OutboxError(f"outbox.path = '{self.path}': cannot open its lock: {exc}"))
            return
        try:
            # Workers starting together would otherwise race to switch a new file to WAL,
            # and SQLite answers that race with "database is locked", not with a wait.
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                conn = connect(self.path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        except OutboxError as exc:
            os.close(lock)
            opened.put(exc)
            return
        opened.put(None)
        while True:
            first = self._jobs.get()
            if first is None:
                break
            batch = [first]
            stop = False
            while len(batch) < _MAX_BATCH:
                try:
                    job = self._jobs.get_nowait()
                except stdqueue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                batch.append(job)
            self._run_batch(conn, lock, batch)
            if stop:
                break
        conn.close()
        os.close(lock)

    def _run_batch(self, conn: sqlite3.Connection, lock: int, batch: list[_Job]) -> None:
        results: list[tuple[Any, BaseException | None]]
        try:
            results = [(value, None) for value in _transaction(conn, batch, lock)]
        except Exception as exc:
            # Optimistic group commit: no savepoint per job on the common path. When something
            # failed, each job runs again in a transaction of its own, so only the faulty one
            # fails. Jobs are functions of the connection alone, so running one again is safe.
            if len(batch) == 1:
                results = [(None, OutboxError(f"outbox write failed: {exc}"))]
            else:
                results = [_alone(conn, job, lock) for job in batch]
        # One wake-up per event loop for the whole batch rather than one per job.
        answers: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, Any]]] = {}
        for job, (result, error) in zip(batch, results, strict=True):
            answers.setdefault(job.loop, []).append((job.future, result, error))
        for loop, items in answers.items():
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
                loop.call_soon_threadsafe(_resolve_all, items)

    async def run(self, func: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``func`` inside the next group transaction; return once it has committed."""
        if self._closing or not self._thread.is_alive():
            raise OutboxError("outbox is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put(_Job(func, loop, future))
        return await future

    async def close(self) -> None:
        """Finish the jobs already queued, then close the connection."""
        # From here on run() refuses: the writer stops at the None below, so a job queued
        # behind it while the thread winds down would never be answered.
        self._closing = True
        if self._thread.is_alive():
            self._jobs.put(None)
            await asyncio.to_thread(self._thread.join)

    # -- operations --------------------------------------------------------------------------

    async def accept(
        self, body: bytes, signature: str, routes: Sequence[Route], now: float
    ) -> list[Delivery] | None:
        """Store a verified notification and its deliveries; return the deliveries (so the
        dispatcher can start them without reading them back). ``None``: an identical body was
        already received inside the deduplication window, and nothing new is stored."""
        digest = hashlib.sha256(body).digest()
        since = now - self.dedup_window_s

        def job(conn: sqlite3.Connection) -> list[Delivery] | None:
            seen = conn.execute(
                "SELECT 1 FROM notifications WHERE digest = ? AND received_at >= ? LIMIT 1",
                (digest, since),
            ).fetchone()
            if seen:
                return None
            notification_id = conn.execute(
                "INSERT INTO notifications (digest, received_at, signature, body)"
                " VALUES (?, ?, ?, ?)",
                (digest, now, signature, body),
            ).lastrowid
            assert notification_id is not None
            deliveries = [
                Delivery(
                    id=secrets.token_hex(16),
                    notification_id=notification_id,
                    target=r.target,
                    body=body if r.body is None else r.body,
                    signature=signature,
                    split=r.body is not None,
                    state="pending",
                    attempts=0,
                    created_at=now,
                    next_attempt_at=now,
                    received_at=now,
                )
                for r in routes
            ]
            conn.executemany(
                "INSERT INTO deliveries (id, notification_id, target, body, state, created_at,"
                " next_attempt_at, updated_at) VALUES (?, ?, ?, ?, 'pending', ?, ?, ?)",
                [
                    (d.id, notification_id, d.target, d.body if d.split else None, now, now, now)
                    for d in deliveries
                ],
            )
            return deliveries

        return await self.run(job)

    async def due(
        self, now: float, limits: Mapping[str, int], exclude: Collection[str] = ()
    ) -> list[Delivery]:
        """Pending deliveries whose time has come, oldest first: at most ``limits[target]`` for
        each target named there, leaving out the ids in ``exclude`` (in flight).

        One index seek per target: a target that is down with a million deliveries waiting
        costs nothing when it is not asked for, and never crowds out the others.
        """
        skip = frozenset(exclude)  # a copy: the caller's collection changes on its own thread
        wanted = dict(limits)

        def job(conn: sqlite3.Connection) -> list[Delivery]:
            found: list[Delivery] = []
            for target, limit in wanted.items():
                rows = conn.execute(
                    f"SELECT {_DELIVERY_COLUMNS} FROM deliveries d"  # noqa: S608 (constant)
                    " JOIN notifications n ON n.id = d.notification_id"
                    " WHERE d.state = 'pending' AND d.target = ? AND d.next_attempt_at <= ?"
                    " ORDER BY d.next_attempt_at LIMIT ?",
                    (target, now, limit + len(skip)),
                ).fetchall()
                found.extend([_delivery(row) for row in rows if row[0] not in skip][:limit])
            found.sort(key=lambda d: d.next_attempt_at)
            return found

        return await self.run(job)

    async def dead_letter_unknown(self, targets: Collection[str], now: float) -> int:
        """Dead-letter pending deliveries whose target is no longer configured."""
        names = tuple(targets)
        marks = ", ".join("?" * len(names))

        def job(conn: sqlite3.Connection) -> int:
            return int(
                conn.execute(
                    "UPDATE deliveries SET state = 'dead', updated_at = ?,"  # noqa: S608
                    " last_error = 'target ' || quote(target) || ' is no longer configured'"
                    f" WHERE state = 'pending' AND target NOT IN ({marks})",
                    (now, *names),
                ).rowcount
            )

        return await self.run(job)

    async def record(
        self, delivery_id: str, outcome: Outcome, result: AttemptResult, now: float
    ) -> None:
        """Store the outcome of one attempt."""
        if isinstance(outcome, Delivered):
            state, next_at, error = "delivered", now, None
        elif isinstance(outcome, RetryAt):
            state, next_at, error = "pending", outcome.at, outcome.reason
        else:
            assert isinstance(outcome, DeadLetter)
            state, next_at, error = "dead", now, outcome.reason
        excerpt = result.response_excerpt[:_EXCERPT_CHARS]

        def job(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE deliveries SET state = ?, attempts = attempts + 1, next_attempt_at = ?,"
                " updated_at = ?, last_status = ?, last_error = ?, last_response = ?"
                " WHERE id = ?",
                (state, next_at, now, result.status, error, excerpt, delivery_id),
            )

        await self.run(job)

    async def query(
        self, *, state: str | None = None, target: str | None = None, limit: int = 100
    ) -> list[Delivery]:
        return await self.run(lambda conn: list_deliveries(conn, state, target, limit))

    async def replay(self, delivery_id: str, now: float) -> bool:
        """Make a delivery pending again, due now, with a fresh attempt count and age."""
        return await self.run(lambda conn: replay_delivery(conn, delivery_id, now))

    async def prune(self, now: float, retention_s: float, targets: Collection[str]) -> int:
        """Remove ``targets``' delivered rows and fully delivered notifications older than the
        retention (and the deduplication window); dead letters and pending deliveries stay."""
        horizon = now - max(retention_s, self.dedup_window_s)
        names = tuple(targets)

        def job(conn: sqlite3.Connection) -> int:
            # A delivered row's next_attempt_at is its delivery time (see record), so the
            # deliveries_due index finds old delivered rows of each target without a scan.
            removed = sum(
                conn.execute(
                    "DELETE FROM deliveries WHERE state = 'delivered' AND target = ?"
                    " AND next_attempt_at < ?",
                    (name, now - retention_s),
                ).rowcount
                for name in names
            )
            conn.execute(
                "DELETE FROM notifications WHERE received_at < ? AND NOT EXISTS"
                " (SELECT 1 FROM deliveries d WHERE d.notification_id = notifications.id)",
                (horizon,),
            )
            return int(removed)

        return await self.run(job)

    async def counts(self) -> dict[str, int]:
        def job(conn: sqlite3.Connection) -> dict[str, int]:
            found = dict(
                conn.execute("SELECT state, COUNT(*) FROM deliveries GROUP BY state").fetchall()
            )
            return {state: int(found.get(state, 0)) for state in STATES}

        return await self.run(job)


# Synchronous helpers shared by the writer thread and the offline CLI (`deliveries ...`).


def list_deliveries(
    conn: sqlite3.Connection, state: str | None, target: str | None, limit: int
) -> list[Delivery]:
    clauses, params = [], []
    if state is not None:
        clauses.append("d.state = ?")
        params.append(state)
    if target is not None:
        clauses.append("d.target = ?")
        params.append(target)
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = conn.execute(
        f"SELECT {_DELIVERY_COLUMNS} FROM deliveries d"  # noqa: S608 (constant fragments)
        f" JOIN notifications n ON n.id = d.notification_id{where}"
        " ORDER BY d.updated_at DESC LIMIT ?",
        (*params, limit),
    ).fetchall()
    return [_delivery(row) for row in rows]


def replay_delivery(conn: sqlite3.Connection, delivery_id: str, now: float) -> bool:
    cursor = conn.execute(
        "UPDATE deliveries SET state = 'pending', attempts = 0, created_at = ?,"
        " next_attempt_at = ?, updated_at = ? WHERE id = ?",
        (now, now, now, delivery_id),
    )
    return cursor.rowcount == 1
