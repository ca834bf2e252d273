"""The outbox's writer: one thread that owns the SQLite connection and commits jobs in groups.

Rule: a durable job's future resolves only after the transaction that ran it has committed with
``synchronous=FULL``, so whoever awaits it may say "stored". Everything waiting is run in one
transaction (group commit): concurrent requests share one fsync, yet each is answered only after
its own commit.

What makes the groups larger, which is what makes the commits cheap:

- Jobs submitted during one turn of the event loop reach the thread as one list, at the end of
  that turn, rather than one by one (one wake-up, one group).
- A group holding a single notification, while notifications arrive a millisecond or two apart
  (new TLS connections at the rate one core completes their handshakes), lingers for the next
  one before it commits: two notifications per fsync halve the cost of the commits, for a wait
  shorter than the gap between notifications. When they arrive more slowly nothing lingers; when
  they arrive faster the groups are already large (:func:`linger_for`).
- A *lazy* job (the outcome of a delivery attempt, whose loss in a power cut only means sending
  it again, which at-least-once allows) does not start a commit of its own: it waits up to
  ``LAZY_WAIT_S`` for a durable job to share one. Its future still resolves only after it has
  committed, so nothing reads a state that is not in the file.
- After a commit the thread yields its core, so that the event loop answers that group before
  the next one starts (see the end of ``Writer._commit``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import queue as stdqueue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from gateway.errors import OutboxError

__all__ = ["LAZY_WAIT_S", "LINGER_MAX_S", "Writer", "linger_for"]

T = TypeVar("T")
MAX_GROUP = 512
# At the new-connection rates one core sustains, a notification arrives every millisecond or
# two: long enough for an attempt's outcome to ride along with the next one.
LAZY_WAIT_S = 0.005
# The longest a lone notification waits for company; well under a millisecond-scale fsync's
# share of the 250 ms median Meta asks for.
LINGER_MAX_S = 0.002
# Weight of the newest gap in the running average of gaps between notifications.
_GAP_WEIGHT = 0.2

Job = Callable[[sqlite3.Connection], Any]


class _Job:
    __slots__ = ("durable", "func", "future", "loop")

    def __init__(
        self,
        func: Job,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
        durable: bool,
    ) -> None:
        self.func = func
        self.loop = loop
        self.future = future
        self.durable = durable


def linger_for(durable_jobs: int, average_gap_s: float | None) -> float:
    """How long a group of ``durable_jobs`` waits for one more before it commits, given the
    running average gap between groups that held durable jobs (``None``: no history yet)."""
    if durable_jobs != 1 or average_gap_s is None or average_gap_s > LINGER_MAX_S:
        return 0.0
    # A little over the usual gap: long enough to catch the next one, no longer.
    return min(LINGER_MAX_S, 1.5 * average_gap_s)


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


class Writer:
    """Runs jobs (functions of the connection) on the thread that owns it, in group commits.

    ``open_connection`` runs on that thread, under the writers' lock; its failure is raised
    here, at start-up. Jobs are submitted from one event loop at a time.
    """

    def __init__(
        self,
        path: Path,
        open_connection: Callable[[Path], sqlite3.Connection],
        on_commit: Callable[[int], None] | None = None,
    ) -> None:
        self.path = path
        self._open_connection = open_connection
        self._on_commit = on_commit  # called on this thread with each group's size
        self._queue: stdqueue.SimpleQueue[list[_Job] | None] = stdqueue.SimpleQueue()
        self._turn: list[_Job] = []  # submitted during this turn of the event loop
        self._closing = False
        # The writer thread's running average gap between arrivals of durable jobs.
        self._gap: float | None = None
        self._last_durable = 0.0
        opened: stdqueue.SimpleQueue[BaseException | None] = stdqueue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._run, args=(opened,), name="outbox-writer", daemon=True
        )
        self._thread.start()
        failure = opened.get()
        if failure is not None:
            raise failure

    # -- the event loop's side ---------------------------------------------------------------

    def submit(self, func: Job, *, durable: bool = True) -> asyncio.Future[Any]:
        """Queue ``func``; the future resolves with its result once its group has committed."""
        if self._closing or not self._thread.is_alive():
            raise OutboxError("outbox is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._turn:
            loop.call_soon(self._hand_over)
        self._turn.append(_Job(func, loop, future, durable))
        return future

    def _hand_over(self) -> None:
        turn, self._turn = self._turn, []
        if turn:
            self._queue.put(turn)

    async def close(self) -> None:
        """Finish the jobs already submitted, then close the connection."""
        # From here on submit() refuses: the thread stops at the None below, so a job queued
        # behind it would never be answered.
        self._closing = True
        self._hand_over()
        if self._thread.is_alive():
            self._queue.put(None)
            await asyncio.to_thread(self._thread.join)

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
                conn = self._open_connection(self.path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        except OutboxError as exc:
            os.close(lock)
            opened.put(exc)
            return
        opened.put(None)
        try:
            self._serve(conn, lock)
        finally:
            conn.close()
            os.close(lock)

    def _serve(self, conn: sqlite3.Connection, lock: int) -> None:
        waiting: list[_Job] = []  # lazy jobs waiting for a durable one to commit with
        deadline = 0.0
        while True:
            timeout = max(0.0, deadline - time.monotonic()) if waiting else None
            jobs, stop = self._take(timeout)
            group = waiting + jobs
            durable = sum(job.durable for job in group)
            if group and not stop and not durable:
                if not waiting:
                    deadline = time.monotonic() + LAZY_WAIT_S
                if time.monotonic() < deadline:
                    waiting = group
                    continue
            waiting = []
            if durable:
                self._arrived()
                linger = 0.0 if stop else linger_for(durable, self._gap)
                if linger > 0.0:
                    more, stop = self._take(linger)
                    if any(job.durable for job in more):
                        self._arrived()
                    group += more
            for start in range(0, len(group), MAX_GROUP):
                self._commit(conn, lock, group[start : start + MAX_GROUP])
            if stop:
                return

    def _arrived(self) -> None:
        """Note that durable jobs arrived now, for the running average gap."""
        now = time.monotonic()
        if self._last_durable:
            latest = now - self._last_durable
            self._gap = (
                latest if self._gap is None else self._gap + _GAP_WEIGHT * (latest - self._gap)
            )
        self._last_durable = now

    def _take(self, timeout: float | None) -> tuple[list[_Job], bool]:
        """The jobs queued, and whether close() asked the thread to stop; waits up to
        ``timeout`` (``None``: for ever) for the first hand-over."""
        try:
            items = [self._queue.get(timeout=timeout)]
        except stdqueue.Empty:
            return [], False
        while len(items) < MAX_GROUP:
            try:
                items.append(self._queue.get_nowait())
            except stdqueue.Empty:
                break
        return [job for item in items if item is not None for job in item], None in items

    def _commit(self, conn: sqlite3.Connection, lock: int, group: list[_Job]) -> None:
        results: list[tuple[Any, BaseException | None]]
        try:
            results = [(value, None) for value in _transaction(conn, group, lock)]
            if self._on_commit is not None:
                self._on_commit(len(group))
        except Exception as exc:
            # Optimistic group commit: no savepoint per job on the common path. When something
            # failed, each job runs again in a transaction of its own, so only the faulty one
            # fails. Jobs are functions of the connection alone, so running one again is safe.
            if len(group) == 1:
                results = [(None, OutboxError(f"outbox write failed: {exc}"))]
            else:
                results = [_alone(conn, job, lock) for job in group]
        # One wake-up per event loop for the whole group rather than one per job.
        answers: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, Any]]] = {}
        for job, (result, error) in zip(group, results, strict=True):
            answers.setdefault(job.loop, []).append((job.future, result, error))
        for loop, items in answers.items():
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
                loop.call_soon_threadsafe(_resolve_all, items)
        # Give the core to the event loop before the next group starts, so that it answers this
        # group first. Otherwise, on a core that the loop and this thread share, the answers
        # wait behind the next group's statements (the loop needs the GIL that those hold), and
        # the clients' next requests arrive later, split into two groups that each pay for an
        # fsync. Answered first, they arrive while this thread waits and form one larger group.
        os.sched_yield()
