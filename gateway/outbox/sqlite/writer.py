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

Faults are bounded and visible:

- A *read* job (the dispatcher's claims, listings) that finds no write beside it runs in a read
  transaction: no write lock, no commit, so an idle gateway polling for due deliveries writes
  nothing.
- A group whose transaction cannot begin or commit (the file locked by another process past the
  busy timeout, a full disk, an I/O error) fails as a whole, at once: running each job again
  alone would make every request wait the busy timeout once more.
- Before each write transaction the file at the path is compared with the one open (device and
  inode): when the file or its folder was removed or replaced, nothing written would survive a
  restart, so every write is refused from then on, with one log line.
- Before each transaction, read or write, the file, its log and its shared-memory index
  (``-wal``, ``-shm``) must be writable: SQLite writes the index through a shared mapping
  (mmap) even to read, and a write to a mapping of a file made read-only or immutable
  (``chattr +i``) is answered by the kernel with SIGBUS, which ends the process. So the group
  fails instead, as when its transaction cannot begin, until the files are writable again.
- :attr:`Writer.failure` says why the last write transaction failed (``None`` once one commits),
  for readiness.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import queue as stdqueue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from gateway.errors import OutboxError

__all__ = ["LAZY_WAIT_S", "LINGER_MAX_S", "Writer", "linger_for", "unwritable"]

log = logging.getLogger(__name__)

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
    __slots__ = ("at", "durable", "func", "future", "loop", "read")

    def __init__(
        self,
        func: Job,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
        durable: bool,
        read: bool = False,
    ) -> None:
        self.func = func
        self.loop = loop
        self.future = future
        self.durable = durable
        self.read = read  # writes nothing: runs at once, in a read transaction when alone
        self.at = time.monotonic()  # submitted


class _GroupFailed(Exception):
    """The transaction itself failed (begin or commit), not one of its jobs."""


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


def _transaction(conn: sqlite3.Connection, jobs: Sequence[_Job], lock: int | None) -> list[Any]:
    """Run ``jobs`` in one transaction and commit; on any error roll back and raise
    (:class:`_GroupFailed` when the transaction could not begin or commit). ``lock=None``: a
    read transaction, which takes no lock.

    Worker processes sharing the outbox queue on an flock of ``lock`` first. SQLite's own
    busy handler would do, but it sleeps 1, 2, 5, 10... ms between tries, so two processes
    writing at full speed spend their time asleep; the kernel lock wakes the next writer as
    soon as the previous one commits.
    """
    if lock is not None:
        fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        try:
            conn.execute("BEGIN" if lock is None else "BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _GroupFailed(exc) from exc
        try:
            values = [job.func(conn) for job in jobs]
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise _GroupFailed(exc) from exc
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
    finally:
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return values


def _alone(conn: sqlite3.Connection, job: _Job, lock: int) -> tuple[Any, BaseException | None]:
    try:
        return _transaction(conn, [job], lock)[0], None
    except Exception as exc:
        return None, OutboxError(f"outbox write failed: {exc}")


def _identity(path: Path) -> tuple[int, int] | None:
    """The device and inode of the file at ``path``; ``None`` when there is none."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def unwritable(path: Path) -> str | None:
    """Why the outbox at ``path`` must not be touched now (see the module docstring): one of
    its files exists and may not be written; ``None`` when all may be."""
    for name in (path.name, f"{path.name}-wal", f"{path.name}-shm"):
        file = path.with_name(name)
        # access(2) refuses writing to an immutable file even to root; a file not there yet
        # is SQLite's to create.
        if not os.access(file, os.W_OK) and file.exists():
            return (
                f"outbox file '{file}' cannot be written (read-only or immutable); nothing is"
                " acknowledged until it can"
            )
    return None


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
        busy_timeout_s: float | None = None,
    ) -> None:
        """``busy_timeout_s``: the busy timeout ``open_connection`` gives the connection; while
        writes fail, a group waits only what is left of it since its oldest job came."""
        self.path = path
        self._open_connection = open_connection
        self._busy_timeout_s = busy_timeout_s
        self._shortened = False  # the connection's busy timeout is below busy_timeout_s
        self._on_commit = on_commit  # called on this thread with each group's size
        self._queue: stdqueue.SimpleQueue[list[_Job] | None] = stdqueue.SimpleQueue()
        self._turn: list[_Job] = []  # submitted during this turn of the event loop
        self._closing = False
        # The writer thread's running average gap between arrivals of durable jobs.
        self._gap: float | None = None
        self._last_durable = 0.0
        # Why the last write transaction failed; None once one commits. Set on the writer
        # thread, read by readiness on the event loop's (a str is replaced atomically).
        self.failure: str | None = None
        self._identity: tuple[int, int] | None = None  # of the file opened
        self._lost: str | None = None  # the file opened is no longer at the path: for good
        opened: stdqueue.SimpleQueue[BaseException | None] = stdqueue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._run, args=(opened,), name="outbox-writer", daemon=True
        )
        self._thread.start()
        failure = opened.get()
        if failure is not None:
            raise failure

    # -- the event loop's side ---------------------------------------------------------------

    def submit(self, func: Job, *, durable: bool = True, read: bool = False) -> asyncio.Future[Any]:
        """Queue ``func``; the future resolves with its result once its group has committed.
        ``read``: ``func`` writes nothing (it runs at once, and alone in a read transaction)."""
        if self._closing or not self._thread.is_alive():
            raise OutboxError("outbox is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._turn:
            loop.call_soon(self._hand_over)
        self._turn.append(_Job(func, loop, future, durable and not read, read))
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
        self._identity = _identity(self.path)
        opened.put(None)
        try:
            self._serve(conn, lock)
        finally:
            # Closing checkpoints the log, through the shared index: not while that would
            # kill the process (the operating system releases what is left open at exit).
            if unwritable(self.path) is None:
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
            urgent = durable or any(job.read for job in group)
            if group and not stop and not urgent:
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
                part = group[start : start + MAX_GROUP]
                if all(job.read for job in part):
                    self._read(conn, part)
                else:
                    self._commit(conn, lock, part)
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

    @property
    def lost(self) -> bool:
        """The file open is no longer the one at the path (see the module docstring)."""
        return self._lost is not None

    def _still_there(self) -> bool:
        """Whether the file at the path is still the one open; logs once when it is not."""
        if self._lost is None and _identity(self.path) != self._identity:
            self._lost = (
                f"outbox file '{self.path}' was removed or replaced while the gateway ran;"
                " nothing written to it would survive a restart, so nothing more is acknowledged:"
                " restore it or restart the gateway"
            )
            log.error("%s", self._lost)
        return self._lost is None

    def _read(self, conn: sqlite3.Connection, group: list[_Job]) -> None:
        """Jobs that write nothing, in one read transaction: no write lock, no commit."""
        results: list[tuple[Any, BaseException | None]]
        if not self._still_there():
            error = OutboxError(self._lost or "outbox lost")
            results = [(None, error)] * len(group)
        elif (refused := unwritable(self.path)) is not None:
            results = [(None, OutboxError(refused))] * len(group)
        else:
            try:
                results = [(value, None) for value in _transaction(conn, group, None)]
            except Exception as exc:
                results = [(None, OutboxError(f"outbox read failed: {exc}"))] * len(group)
        self._answer(group, results)

    def _commit(self, conn: sqlite3.Connection, lock: int, group: list[_Job]) -> None:
        results: list[tuple[Any, BaseException | None]]
        if not self._still_there():
            self.failure = self._lost
            error = OutboxError(self._lost or "outbox lost")
            self._answer(group, [(None, error)] * len(group))
            return
        if (refused := unwritable(self.path)) is not None:
            self.failure = refused
            self._answer(group, [(None, OutboxError(refused))] * len(group))
            return
        self._bound_wait(conn, group)
        try:
            results = [(value, None) for value in _transaction(conn, group, lock)]
            self.failure = None
            if self._on_commit is not None:
                self._on_commit(len(group))
        except _GroupFailed as exc:
            # The transaction, not a job, failed (locked past the busy timeout, disk full, I/O
            # error): every job would fail alone too, each after the same wait.
            self.failure = f"outbox write failed: {exc}"
            results = [(None, OutboxError(self.failure))] * len(group)
        except Exception as exc:
            # Optimistic group commit: no savepoint per job on the common path. When something
            # failed, each job runs again in a transaction of its own, so only the faulty one
            # fails. Jobs are functions of the connection alone, so running one again is safe.
            if len(group) == 1:
                results = [(None, OutboxError(f"outbox write failed: {exc}"))]
            else:
                results = [_alone(conn, job, lock) for job in group]
            # Nothing committed (a file turned read-only fails in the first statement, not at
            # the commit): readiness must not say otherwise until a write succeeds.
            failed = [error for _, error in results if error is not None]
            self.failure = str(failed[0]) if len(failed) == len(results) else None
        self._answer(group, results)
        # Give the core to the event loop before the next group starts, so that it answers this
        # group first. Otherwise, on a core that the loop and this thread share, the answers
        # wait behind the next group's statements (the loop needs the GIL that those hold), and
        # the clients' next requests arrive later, split into two groups that each pay for an
        # fsync. Answered first, they arrive while this thread waits and form one larger group.
        os.sched_yield()

    def _bound_wait(self, conn: sqlite3.Connection, group: list[_Job]) -> None:
        """While writes fail (a lock held elsewhere), no job waits longer than the busy timeout
        from its own arrival: a group that queued behind a failing one gets what is left."""
        if self._busy_timeout_s is None:
            return
        full = self._busy_timeout_s
        if self.failure is not None:
            left = min(job.at for job in group) + full - time.monotonic()
            conn.execute(f"PRAGMA busy_timeout = {max(0, int(left * 1000))}")
            self._shortened = True
        elif self._shortened:
            conn.execute(f"PRAGMA busy_timeout = {int(full * 1000)}")
            self._shortened = False

    def _answer(self, group: list[_Job], results: list[tuple[Any, BaseException | None]]) -> None:
        # One wake-up per event loop for the whole group rather than one per job.
        answers: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, Any]]] = {}
        for job, (result, error) in zip(group, results, strict=True):
            answers.setdefault(job.loop, []).append((job.future, result, error))
        for loop, items in answers.items():
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
                loop.call_soon_threadsafe(_resolve_all, items)
