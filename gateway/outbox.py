"""The outbox: a SQLite file that holds every acknowledged notification until it is delivered.

Rule: a notification is acknowledged only after the transaction that stores it and its deliveries
has committed with ``synchronous=FULL`` in WAL mode, so a power cut after the 200 loses nothing.

One writer thread owns the connection. Requests hand it jobs; it runs every job that is waiting
in one transaction (group commit), each inside its own savepoint so one failing job cannot spoil
the others, commits once, and only then answers each job. Concurrent requests thus share the cost
of one fsync, yet each is answered only after its own data is on disk.

Delivery ids are ``<prefix>-<row id>``: the row id is the deliveries table's own key
(AUTOINCREMENT, so an id is never handed out twice, even after pruning), and the prefix is random,
made once with the file, so ids stay unique across gateways. Targets receive the id as
``X-Gateway-Delivery-Id`` and may deduplicate on it.

The file records its layout in ``PRAGMA user_version``; a file of another layout is refused at
open, never written in a mix of two layouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
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
# Rows one prune step reads or removes: each step is one job in a group commit, so a large
# backlog to prune delays the notifications committed with it by one step (some 100 ms), not by
# all of it. Not smaller: every step rewrites the digest index pages its deletions touch, which
# lie all over that index, so smaller steps cost more CPU per row removed.
_PRUNE_BATCH = 5000
_MAX_ROWID = 2**63 - 1

# PRAGMA user_version of the layout below. Layout 1 had random TEXT delivery ids and left
# user_version at 0.
_LAYOUT = 2
_OLDER_LAYOUT = (
    "made by an older version of the outbox (random text delivery ids); deliver or export its"
    " pending deliveries with the previous version of waba-gateway, or move the file away"
    " (with its -wal and -shm files) to start a new outbox"
)

# Statements one by one rather than a script: executescript() commits first, and the layout is
# created inside the transaction that checked the file was empty.
_SCHEMA = (
    # One row: the prefix of this file's delivery ids.
    "CREATE TABLE meta (delivery_id_prefix TEXT NOT NULL)",
    # No index on received_at: pruning walks rows in id order, which is time order.
    """CREATE TABLE notifications (
    id INTEGER PRIMARY KEY,
    digest BLOB NOT NULL,
    received_at REAL NOT NULL,
    signature TEXT NOT NULL,
    body BLOB NOT NULL
)""",
    "CREATE INDEX notifications_digest ON notifications (digest, received_at)",
    # An integer key is the table's own b-tree key: a random text key needed a second, unique
    # index written at every insert and searched at every update.
    """CREATE TABLE deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
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
)""",
    # Claims read each target's due deliveries in time order; pruning finds old delivered rows.
    "CREATE INDEX deliveries_due ON deliveries (state, target, next_attempt_at)",
    # Pruning asks "does this notification still have deliveries?" (and so does the foreign
    # key when a notification is deleted): without this index, a scan of every delivery.
    "CREATE INDEX deliveries_notification ON deliveries (notification_id)",
)

_SEEN = "SELECT 1 FROM notifications WHERE digest = ? AND received_at >= ? LIMIT 1"
_INSERT_NOTIFICATION = (
    "INSERT INTO notifications (digest, received_at, signature, body) VALUES (?, ?, ?, ?)"
)
_INSERT_DELIVERY = (
    "INSERT INTO deliveries (notification_id, target, body, state, created_at, next_attempt_at,"
    " updated_at) VALUES (?, ?, ?, 'pending', ?, ?, ?)"
)
# Prune: a notification goes once it is older than the horizon and has no deliveries left.
_DELETE_ORPHAN = (
    "DELETE FROM notifications WHERE id = ? AND received_at < ? AND NOT EXISTS"
    " (SELECT 1 FROM deliveries d WHERE d.notification_id = notifications.id)"
)
_DELETE_ORPHANS_BETWEEN = (
    "DELETE FROM notifications WHERE id > ? AND id <= ? AND received_at < ? AND NOT EXISTS"
    " (SELECT 1 FROM deliveries d WHERE d.notification_id = notifications.id)"
)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One request owed to one target. ``body`` is what to send; ``signature`` is Meta's.
    ``id`` is ``<prefix>-<row id>``, unique across outboxes (see the module docstring)."""

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


def _delivery(row: tuple[Any, ...], prefix: str) -> Delivery:
    return Delivery(
        id=f"{prefix}-{row[0]}",
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


def _rowid(delivery_id: str, prefix: str) -> int | None:
    """The row id that ``delivery_id`` names in the outbox whose prefix is ``prefix``; ``None``
    when it is another outbox's id or no delivery id at all (so it finds nothing)."""
    head, _, digits = delivery_id.rpartition("-")
    if head != prefix or not (digits.isascii() and digits.isdigit()) or len(digits) > 19:
        return None
    rowid = int(digits)
    # Only the spelling this module writes: "p-007" names nothing rather than delivery 7.
    return rowid if str(rowid) == digits and rowid <= _MAX_ROWID else None


def _user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _create(conn: sqlite3.Connection, path: Path) -> None:
    """Give an empty file the current layout; refuse a file that holds anything else."""
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "deliveries" in tables:
        raise OutboxError(f"outbox.path = '{path}': {_OLDER_LAYOUT}")
    if tables:
        raise OutboxError(
            f"outbox.path = '{path}': not an outbox (it holds tables {', '.join(sorted(tables))});"
            " point outbox.path at a new file"
        )
    for statement in _SCHEMA:
        conn.execute(statement)
    conn.execute("INSERT INTO meta (delivery_id_prefix) VALUES (?)", (secrets.token_hex(8),))
    conn.execute(f"PRAGMA user_version = {_LAYOUT}")


def _layout(conn: sqlite3.Connection, path: Path) -> str:
    """Check the file's layout (creating it in a new file); return its delivery id prefix."""
    if _user_version(conn) == 0:
        conn.execute("BEGIN IMMEDIATE")
        try:
            if _user_version(conn) == 0:  # again, under the write lock: another opener may win
                _create(conn, path)
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
    version = _user_version(conn)
    if version != _LAYOUT:
        raise OutboxError(
            f"outbox.path = '{path}': made by another version of the outbox (layout {version},"
            f" this version reads layout {_LAYOUT}); run the version that made it, or move the"
            " file away (with its -wal and -shm files) to start a new outbox"
        )
    return _prefix(conn)


def _prefix(conn: sqlite3.Connection) -> str:
    row = conn.execute("SELECT delivery_id_prefix FROM meta").fetchone()
    if row is None:
        raise OutboxError("outbox has no delivery id prefix (its meta table is empty)")
    return str(row[0])


def _open(path: Path) -> tuple[sqlite3.Connection, str]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)
    except (OSError, sqlite3.Error) as exc:
        raise OutboxError(f"outbox.path = '{path}': cannot open: {exc}") from exc
    try:
        # FULL: the WAL is synced at every commit, so a committed notification survives power
        # loss; NORMAL would only survive a process crash.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        # The layout first: a file that is refused is not even switched to WAL.
        prefix = _layout(conn, path)
        conn.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as exc:
        conn.close()
        raise OutboxError(f"outbox.path = '{path}': cannot open: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn, prefix


def connect(path: Path) -> sqlite3.Connection:
    """Open ``path`` with the durability settings the outbox promises, giving a new file the
    current layout; a file of another layout raises OutboxError."""
    return _open(path)[0]


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
        self._prefix = ""  # set by the writer thread before the constructor returns
        # The last notification id the prune walk has passed (see prune). Kept in memory: after
        # a restart the first prune walks from the oldest row again, which is only slower.
        self._prune_after = 0
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
                conn, self._prefix = _open(self.path)
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

        def job(conn: sqlite3.Connection) -> tuple[int, list[int]] | None:
            if conn.execute(_SEEN, (digest, since)).fetchone():
                return None
            notification_id = conn.execute(
                _INSERT_NOTIFICATION, (digest, now, signature, body)
            ).lastrowid
            assert notification_id is not None
            # One execute per route, not executemany: each insert's lastrowid is its id, and
            # the usual single route costs less this way.
            rowids = []
            for route in routes:
                rowid = conn.execute(
                    _INSERT_DELIVERY, (notification_id, route.target, route.body, now, now, now)
                ).lastrowid
                assert rowid is not None
                rowids.append(rowid)
            return notification_id, rowids

        stored = await self.run(job)
        if stored is None:
            return None
        # The Delivery objects are built here, after the commit, rather than in the job: the
        # job runs under the write lock that the other worker processes wait for.
        notification_id, rowids = stored
        return [
            Delivery(
                id=f"{self._prefix}-{rowid}",
                notification_id=notification_id,
                target=route.target,
                body=body if route.body is None else route.body,
                signature=signature,
                split=route.body is not None,
                state="pending",
                attempts=0,
                created_at=now,
                next_attempt_at=now,
                received_at=now,
            )
            for route, rowid in zip(routes, rowids, strict=True)
        ]

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
        prefix = self._prefix

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
                fresh = [row for row in rows if f"{prefix}-{row[0]}" not in skip][:limit]
                found.extend([_delivery(row, prefix) for row in fresh])
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
        rowid = _rowid(delivery_id, self._prefix)

        def job(conn: sqlite3.Connection) -> None:
            if rowid is None:  # not this outbox's delivery: like an id that matches no row
                return
            conn.execute(
                "UPDATE deliveries SET state = ?, attempts = attempts + 1, next_attempt_at = ?,"
                " updated_at = ?, last_status = ?, last_error = ?, last_response = ?"
                " WHERE id = ?",
                (state, next_at, now, result.status, error, excerpt, rowid),
            )

        await self.run(job)

    async def query(
        self, *, state: str | None = None, target: str | None = None, limit: int = 100
    ) -> list[Delivery]:
        prefix = self._prefix
        return await self.run(lambda conn: list_deliveries(conn, state, target, limit, prefix))

    async def replay(self, delivery_id: str, now: float) -> bool:
        """Make a delivery pending again, due now, with a fresh attempt count and age. False
        when no delivery of this outbox has that id (including ids of other outboxes)."""
        prefix = self._prefix
        return await self.run(lambda conn: replay_delivery(conn, delivery_id, now, prefix))

    async def prune(self, now: float, retention_s: float, targets: Collection[str]) -> int:
        """Remove ``targets``' delivered rows older than the retention, and notifications older
        than the retention and the deduplication window that have no deliveries left; dead
        letters and pending deliveries stay. Returns the number of delivered rows removed.

        Work in steps of at most ``_PRUNE_BATCH`` rows, each its own job: requests committing
        meanwhile wait for one step, not for the whole backlog.
        """
        horizon = now - max(retention_s, self.dedup_window_s)
        removed = 0
        for name in tuple(targets):
            while True:
                step = functools.partial(
                    _prune_delivered,
                    target=name,
                    before=now - retention_s,
                    horizon=horizon,
                    walked=self._prune_after,
                )
                count = await self.run(step)
                removed += count
                if count < _PRUNE_BATCH:
                    break
        while True:
            walk = functools.partial(_prune_notifications, after=self._prune_after, horizon=horizon)
            # The position is kept only once the step has committed: a step that is rolled
            # back (and run again alone) must not have moved it.
            self._prune_after, done = await self.run(walk)
            if done:
                return removed

    async def counts(self) -> dict[str, int]:
        def job(conn: sqlite3.Connection) -> dict[str, int]:
            found = dict(
                conn.execute("SELECT state, COUNT(*) FROM deliveries GROUP BY state").fetchall()
            )
            return {state: int(found.get(state, 0)) for state in STATES}

        return await self.run(job)


def _prune_delivered(
    conn: sqlite3.Connection, *, target: str, before: float, horizon: float, walked: int
) -> int:
    """Remove up to ``_PRUNE_BATCH`` of ``target``'s rows delivered before ``before``."""
    # A delivered row's next_attempt_at is its delivery time (see record), so the
    # deliveries_due index finds old delivered rows of each target without a scan.
    rows = conn.execute(
        "SELECT next_attempt_at, id, notification_id FROM deliveries"
        " WHERE state = 'delivered' AND target = ? AND next_attempt_at < ?"
        " ORDER BY next_attempt_at, id LIMIT ?",
        (target, before, _PRUNE_BATCH),
    ).fetchall()
    if not rows:
        return 0
    # The rows just read are exactly those up to the last one in the index's order: one range
    # delete on the index costs half of deleting them one by one.
    conn.execute(
        "DELETE FROM deliveries WHERE state = 'delivered' AND target = ?"
        " AND (next_attempt_at, id) <= (?, ?)",
        (target, rows[-1][0], rows[-1][1]),
    )
    # The walk in _prune_notifications does not go back over the notifications up to `walked`:
    # those that have just lost their last delivery are removed here, each by its id.
    conn.executemany(
        _DELETE_ORPHAN,
        [
            (notification_id, horizon)
            for notification_id in {row[2] for row in rows}
            if notification_id <= walked
        ],
    )
    return len(rows)


def _prune_notifications(
    conn: sqlite3.Connection, *, after: int, horizon: float
) -> tuple[int, bool]:
    """One step of the walk over notifications in id order, from just after ``after``: remove
    those received before ``horizon`` that have no deliveries left. Returns where the next step
    starts and whether the walk is done.

    Ids grow with time, so the first notification inside the horizon ends the walk: a prune
    reads the rows it removes, one more, and the old rows that still have deliveries (pending or
    dead), which ``after`` then steps over until the walk reaches the end of the table, that is
    until the gateway falls idle. Should the clock step back, a young row ends the walk early:
    old rows behind it wait for a later prune; none is removed too soon.
    """
    last, old, young = after, 0, False
    with contextlib.closing(
        conn.execute(
            "SELECT id, received_at FROM notifications WHERE id > ? ORDER BY id LIMIT ?",
            (after, _PRUNE_BATCH),
        )
    ) as rows:
        for rowid, received_at in rows:  # row by row: most walks end at the first row read
            if received_at >= horizon:
                young = True
                break
            last, old = rowid, old + 1
    if old:
        conn.execute(_DELETE_ORPHANS_BETWEEN, (after, last, horizon))
    if young:
        return last, True
    if old < _PRUNE_BATCH:
        # The end of the table: start from the oldest row next time. Without AUTOINCREMENT a
        # new notification may take an id at or below `after` once the newest rows are gone;
        # while any row after `after` remains (the young row that stopped the walk, which only
        # the walk removes), new ids are above it.
        return 0, True
    return last, False


# Synchronous helpers shared by the writer thread and the offline CLI (`deliveries ...`).


def list_deliveries(
    conn: sqlite3.Connection,
    state: str | None,
    target: str | None,
    limit: int,
    prefix: str | None = None,
) -> list[Delivery]:
    """The newest deliveries, filtered; ``prefix`` is the file's id prefix (read when None)."""
    if prefix is None:
        prefix = _prefix(conn)
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
    return [_delivery(row, prefix) for row in rows]


def replay_delivery(
    conn: sqlite3.Connection, delivery_id: str, now: float, prefix: str | None = None
) -> bool:
    """Make one delivery pending again; False when the file has no delivery ``delivery_id``."""
    rowid = _rowid(delivery_id, _prefix(conn) if prefix is None else prefix)
    if rowid is None:
        return False
    cursor = conn.execute(
        "UPDATE deliveries SET state = 'pending', attempts = 0, created_at = ?,"
        " next_attempt_at = ?, updated_at = ? WHERE id = ?",
        (now, now, now, rowid),
    )
    return cursor.rowcount == 1
