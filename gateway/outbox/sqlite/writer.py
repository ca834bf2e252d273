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
  ``LAZY_WAIT_S`` for a durable job to share one (a *patient* one, whose outcome nothing waits
  on, up to ``PATIENT_WAIT_S``). Its future still resolves only after it has committed, so
  nothing reads a state that is not in the file.
- A group of lazy jobs alone (no accept in it) commits with ``synchronous=NORMAL``: no fsync
  of its own. In WAL mode that commit survives a crash of the process, and the next commit
  with ``synchronous=FULL`` (the next accept's) syncs the log with it in, as does a checkpoint;
  a power cut in between loses only outcomes, which at-least-once allows (the deliveries are
  sent again). A draining gateway, which stores nothing new, records outcomes without an fsync
  each.
- After a commit the thread yields its core, so that the event loop answers that group before
  the next one starts (see the end of ``Writer._commit``).

Faults are bounded and visible:

- A *read* job (the dispatcher's claims, listings) that finds no write beside it runs in a read
  transaction: no write lock, no commit, so an idle gateway polling for due deliveries writes
  nothing.
- A group whose transaction cannot begin or commit (the file locked by another process past the
  busy timeout, a full disk, an I/O error) fails as a whole, at once: running each job again
  alone would make every request wait the busy timeout once more.
- No job waits longer than the busy timeout from its own arrival for a lock held outside the
  gateway: a group waits only what is left of its oldest job's, and it waits outside the lock
  the gateway's own processes queue on (:func:`_begin_write`), so that a worker's group never
  waits for another worker's wait and then for its own.
- Before each transaction the file at the path is compared with the one open (device and
  inode): while the file or its folder is removed or replaced, nothing written would survive a
  restart, so every write is refused, with one log line. When the same file is back at the path
  (moved away and moved back), writes go on, with one more line.
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
from gateway.outbox.interface import Settles

__all__ = [
    "LAZY_WAIT_S",
    "LINGER_MAX_S",
    "PATIENT_WAIT_S",
    "Writer",
    "lazy_deadline",
    "linger_for",
    "unwritable",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_GROUP = 512
# At the new-connection rates one core sustains, a notification arrives every millisecond or
# two: long enough for an attempt's outcome to ride along with the next one.
LAZY_WAIT_S = 0.005
# A patient lazy job (outcomes nothing waits on but memory: see SqliteOutbox.record_many) waits
# this long. An ordered target's outcomes, recorded one conversation after another, each delete
# an entry of the place index on a page of its own, so a commit writes about one page of the
# log per outcome until its outcomes outnumber the index's pages: more outcomes per commit,
# fewer pages each.
PATIENT_WAIT_S = 0.02
# The longest a lone notification waits for company; well under a millisecond-scale fsync's
# share of the 250 ms median Meta asks for.
LINGER_MAX_S = 0.002
# Weight of the newest gap in the running average of gaps between notifications.
_GAP_WEIGHT = 0.2

Job = Callable[[sqlite3.Connection], Any]


class _Job:
    __slots__ = ("after", "at", "committed", "durable", "func", "future", "loop", "read", "wait_s")

    def __init__(
        self,
        func: Job,
        loop: asyncio.AbstractEventLoop,
        future: Settles[Any],
        durable: bool,
        read: bool = False,
        after: Callable[[Any], Any] | None = None,
        wait_s: float = LAZY_WAIT_S,
        committed: bool = False,
    ) -> None:
        self.func = func
        self.loop = loop
        self.future = future
        self.durable = durable
        self.read = read  # writes nothing: runs at once, in a read transaction when alone
        self.after = after  # turns the result into the future's, on the event loop's thread
        self.at = time.monotonic()  # submitted
        self.wait_s = wait_s  # a lazy job: the longest it waits for company
        # A read that must see committed rows only: never in a write transaction, where the
        # writes of the jobs before it are not yet committed (and may be rolled back).
        self.committed = committed


class _GroupFailed(Exception):
    """The transaction itself failed (begin or commit), not one of its jobs."""


def lazy_deadline(deadline: float | None, now: float, waits: Sequence[float]) -> float:
    """When a group of lazy jobs alone commits: once its most hurried job has waited as long
    as it may. ``deadline``: the group's so far (``None``: nothing was waiting); ``waits``:
    the longest wait of each job arriving ``now``."""
    if not waits:
        return now if deadline is None else deadline
    soonest = now + min(waits)
    return soonest if deadline is None else min(deadline, soonest)


def linger_for(durable_jobs: int, average_gap_s: float | None) -> float:
    """How long a group of ``durable_jobs`` waits for one more before it commits, given the
    running average gap between groups that held durable jobs (``None``: no history yet)."""
    if durable_jobs != 1 or average_gap_s is None or average_gap_s > LINGER_MAX_S:
        return 0.0
    # A little over the usual gap: long enough to catch the next one, no longer.
    return min(LINGER_MAX_S, 1.5 * average_gap_s)


_Answer = tuple[Settles[Any], Any, BaseException | None, Callable[[Any], Any] | None]


def _resolve_all(items: list[_Answer]) -> None:
    for future, result, error, after in items:
        try:
            if future.done():  # the awaiting request was cancelled (client went away)
                continue
            if error is not None:
                future.set_exception(error)
            elif after is None:
                future.set_result(result)
            else:
                # Here rather than in a callback of the future: one turn of the loop less.
                try:
                    value = after(result)
                except Exception as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(value)
        except Exception:
            # Only a settle that acts at once (not a future) can raise here: the rest of the
            # group is answered all the same.
            log.exception("settling a committed job failed")


class _Busy:
    """The connection's busy timeout, set only when it changes (a statement each time). It
    stays at 0 once a write has set it: reads do not switch it back (see ``Writer._read``), so
    the common path runs no extra statement."""

    __slots__ = ("full_ms", "now_ms")

    def __init__(self, full_s: float) -> None:
        self.full_ms = int(full_s * 1000)
        self.now_ms = self.full_ms  # as the connection was opened

    def set(self, conn: sqlite3.Connection, ms: int) -> None:
        if ms != self.now_ms:
            conn.execute(f"PRAGMA busy_timeout = {ms}")
            self.now_ms = ms


def _begin_write(conn: sqlite3.Connection, lock: int, busy: _Busy, deadline: float) -> bool:
    """``BEGIN IMMEDIATE``; whether it holds the flock of ``lock`` (see :func:`_transaction`).

    Under the flock the gateway's own writers are queued already, so SQLite's lock can only be
    held by another process (a ``sqlite3`` shell, a backup tool): then the flock is released at
    once and the write waits for SQLite's lock until ``deadline`` without it, and the other
    workers, free to try, each wait until their own deadline rather than behind this one.
    """
    fcntl.flock(lock, fcntl.LOCK_EX)
    busy.set(conn, 0)
    try:
        conn.execute("BEGIN IMMEDIATE")
        return True
    except sqlite3.Error as exc:
        fcntl.flock(lock, fcntl.LOCK_UN)
        if not (isinstance(exc, sqlite3.OperationalError) and _is_busy(exc)):
            raise _GroupFailed(exc) from exc
    busy.set(conn, max(0, int((deadline - time.monotonic()) * 1000)))
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        raise _GroupFailed(exc) from exc
    return False


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY


def _is_busy_failure(exc: BaseException) -> bool:
    """``exc`` (or what a :class:`_GroupFailed` wraps) is SQLite's "database is locked"."""
    cause = exc.__cause__ if isinstance(exc, _GroupFailed) else exc
    return isinstance(cause, sqlite3.OperationalError) and _is_busy(cause)


def _transaction(
    conn: sqlite3.Connection,
    jobs: Sequence[_Job],
    lock: int | None,
    busy: _Busy,
    deadline: float = 0.0,
) -> list[Any]:
    """Run ``jobs`` in one transaction and commit; on any error roll back and raise
    (:class:`_GroupFailed` when the transaction could not begin or commit). ``lock=None``: a
    read transaction, which takes no lock, with the busy timeout as it is; else a write
    transaction begun by :func:`_begin_write`, waiting until ``deadline`` at most for a lock
    another process holds.

    Worker processes sharing the outbox queue on an flock of ``lock`` first. SQLite's own
    busy handler would do, but it sleeps 1, 2, 5, 10... ms between tries, so two processes
    writing at full speed spend their time asleep; the kernel lock wakes the next writer as
    soon as the previous one commits.
    """
    held = False
    if lock is not None:
        held = _begin_write(conn, lock, busy, deadline)
    else:
        try:
            conn.execute("BEGIN")
        except sqlite3.Error as exc:
            raise _GroupFailed(exc) from exc
    try:
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
        if held:
            assert lock is not None
            fcntl.flock(lock, fcntl.LOCK_UN)
    return values


def _alone(
    conn: sqlite3.Connection, job: _Job, lock: int, busy: _Busy, deadline: float
) -> tuple[Any, BaseException | None]:
    try:
        return _transaction(conn, [job], lock, busy, deadline)[0], None
    except Exception as exc:
        return None, OutboxError(f"outbox write failed: {exc}")


def _identity(path: Path | str) -> tuple[int, int] | None:
    """The device and inode of the file at ``path``; ``None`` when there is none."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def unwritable(path: Path) -> str | None:
    """Why the outbox at ``path`` must not be touched now (see the module docstring): one of
    its files exists and may not be written; ``None`` when all may be."""
    return _refusal(_files(path))


def _files(path: Path) -> tuple[str, ...]:
    """The outbox file, its log and its shared-memory index, as names for system calls: made
    once per writer, since pathlib's joins cost more than the checks themselves."""
    return tuple(
        str(path.with_name(name)) for name in (path.name, f"{path.name}-wal", f"{path.name}-shm")
    )


def _refusal(files: tuple[str, ...]) -> str | None:
    """:func:`unwritable` of the names :func:`_files` made."""
    for file in files:
        # access(2) refuses writing to an immutable file even to root; a file not there yet
        # is SQLite's to create.
        if not os.access(file, os.W_OK) and os.path.exists(file):
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
        busy_timeout_s: float = 5.0,
    ) -> None:
        """``busy_timeout_s``: the busy timeout ``open_connection`` gives the connection; a
        group waits only what is left of it since its oldest job came."""
        self.path = path
        self._name = str(path)  # for the checks before each transaction, made once
        self._files = _files(path)
        self._open_connection = open_connection
        self._busy_timeout_s = busy_timeout_s
        self._busy = _Busy(busy_timeout_s)  # the writer thread's
        self._relaxed = False  # whether the connection commits with synchronous=NORMAL now
        self._on_commit = on_commit  # called on this thread with each group's size
        self._queue: stdqueue.SimpleQueue[list[_Job] | None] = stdqueue.SimpleQueue()
        self._turn: list[_Job] = []  # submitted during this turn of the event loop
        self._closing = False
        # Whether the thread still serves: cleared as its last act, however it ends. Asked on
        # every submit instead of Thread.is_alive(), which takes a lock (four calls) each time.
        self._serving = True
        # The writer thread's running average gap between arrivals of durable jobs.
        self._gap: float | None = None
        self._last_durable = 0.0
        # Why the last write transaction failed; None once one commits. Set on the writer
        # thread, read by readiness on the event loop's (a str is replaced atomically).
        self.failure: str | None = None
        self._identity: tuple[int, int] | None = None  # of the file opened
        self._lost: str | None = None  # the file opened is no longer at the path
        # Of its write-ahead log, once there is one: SQLite keeps it while a connection is
        # open, so another one at its name means the one written to was removed.
        self._wal_name = f"{path}-wal"
        self._wal_identity: tuple[int, int] | None = None
        opened: stdqueue.SimpleQueue[BaseException | None] = stdqueue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._run, args=(opened,), name="outbox-writer", daemon=True
        )
        self._thread.start()
        failure = opened.get()
        if failure is not None:
            raise failure

    # -- the event loop's side ---------------------------------------------------------------

    def submit(
        self,
        func: Job,
        *,
        durable: bool = True,
        read: bool = False,
        after: Callable[[Any], Any] | None = None,
        wait_s: float = LAZY_WAIT_S,
        committed: bool = False,
    ) -> asyncio.Future[Any]:
        """Queue ``func``; the future resolves with its result once its group has committed.
        ``read``: ``func`` writes nothing (it runs at once, and alone in a read transaction).
        ``after``: the future resolves with ``after(result)`` instead, called on the event
        loop's thread (its exception fails the future). ``wait_s``: how long a lazy job (not
        ``durable``) waits for company before its group commits without a durable one.
        ``committed`` (with ``read``): ``func`` sees only what is committed, in a read
        transaction of its own after the writes queued with it."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.submit_into(
            func,
            future,
            durable=durable,
            read=read,
            after=after,
            wait_s=wait_s,
            committed=committed,
        )
        return future

    def submit_into(
        self,
        func: Job,
        into: Settles[Any],
        *,
        durable: bool = True,
        read: bool = False,
        after: Callable[[Any], Any] | None = None,
        wait_s: float = LAZY_WAIT_S,
        committed: bool = False,
    ) -> None:
        """:meth:`submit`, settling ``into`` (see :class:`~gateway.outbox.interface.Settles`)
        instead of a future of its own."""
        if self._closing or not self._serving:
            raise OutboxError("outbox is closed")
        loop = asyncio.get_running_loop()
        if not self._turn:
            loop.call_soon(self._hand_over)
        self._turn.append(
            _Job(func, loop, into, durable and not read, read, after, wait_s, committed and read)
        )

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
            self._open_and_serve(opened)
        finally:
            self._serving = False

    def _open_and_serve(self, opened: stdqueue.SimpleQueue[BaseException | None]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            opened.put(OutboxError(f"outbox.path = '{self.path}': cannot open its lock: {exc}"))
            return
        conn: sqlite3.Connection | None = None
        try:
            # Workers starting together would otherwise race to switch a new file to WAL,
            # and SQLite answers that race with "database is locked", not with a wait.
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                conn = self._open_connection(self.path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
            self._identity = _identity(self.path)
        except Exception as exc:
            if conn is not None:
                conn.close()
            os.close(lock)
            # Whatever the failure, the constructor waiting on `opened` hears of it: an error
            # outside the outbox's own (a driver's, a bug) must fail the start, not hang it.
            opened.put(
                exc
                if isinstance(exc, OutboxError)
                else OutboxError(f"outbox.path = '{self.path}': cannot open: {exc!r}")
            )
            return
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
                now = time.monotonic()
                deadline = lazy_deadline(
                    deadline if waiting else None, now, [job.wait_s for job in jobs]
                )
                if now < deadline:
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
                elif any(job.committed for job in part):
                    self._commit(conn, lock, [job for job in part if not job.committed])
                    self._read(conn, [job for job in part if job.committed])
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
        queue = self._queue
        try:
            items = [queue.get(timeout=timeout)]
        except stdqueue.Empty:
            return [], False
        # Asked rather than tried: get_nowait() on an empty queue raises, which costs more than
        # the rest of the hand-over, once per group. This thread alone takes from the queue, so
        # what it finds there is still there for get_nowait().
        while len(items) < MAX_GROUP and not queue.empty():
            items.append(queue.get_nowait())
        return [job for item in items if item is not None for job in item], None in items

    @property
    def lost(self) -> bool:
        """The file open was found missing from the path and is not back there yet (see the
        module docstring); checked again here, so that readiness sees it come back."""
        return self._lost is not None and not self._in_place()

    def _in_place(self) -> bool:
        """Whether the file at the path is the one open, and the write-ahead log at
        ``<outbox>-wal`` the one SQLite writes to (once there is one: SQLite keeps it while a
        connection is open, so another one, or none, at its name means it was moved or
        removed)."""
        wal = _identity(self._wal_name)
        if self._wal_identity is None:
            self._wal_identity = wal
        return _identity(self._name) == self._identity and wal == self._wal_identity

    def _still_there(self) -> bool:
        """:meth:`_in_place`; logs when that changes. A removed log is written to and synced
        still, through SQLite's open descriptor, and lost at the first crash."""
        here = self._in_place()
        if not here and self._lost is None:
            what = "file" if _identity(self._name) != self._identity else "log"
            name = self.path if what == "file" else self._wal_name
            self._lost = (
                f"outbox {what} '{name}' was removed or replaced while the gateway ran;"
                " nothing written to it would survive a restart, so nothing more is acknowledged"
                f" until the same {what} is back at that path (moved back) or the gateway"
                " restarts"
            )
            log.error("%s", self._lost)
        elif here and self._lost is not None:
            self._lost = None
            log.warning("outbox file '%s' is back at its path: acknowledging again", self.path)
        return here

    def _read(self, conn: sqlite3.Connection, group: list[_Job]) -> None:
        """Jobs that write nothing, in one read transaction: no write lock, no commit."""
        results: list[tuple[Any, BaseException | None]]
        if not self._still_there():
            error = OutboxError(self._lost or "outbox lost")
            results = [(None, error)] * len(group)
        elif (refused := _refusal(self._files)) is not None:
            results = [(None, OutboxError(refused))] * len(group)
        else:
            try:
                results = [(value, None) for value in _transaction(conn, group, None, self._busy)]
            except Exception as exc:
                if _is_busy_failure(exc) and self._busy.now_ms != self._busy.full_ms:
                    # In WAL a read rarely meets a lock (another process recovering the log,
                    # or holding the file in exclusive mode); when one does, it is read again
                    # waiting the full busy timeout, as it would have without the writes' 0.
                    self._busy.set(conn, self._busy.full_ms)
                    self._read(conn, group)
                    return
                if len(group) == 1 or isinstance(exc, _GroupFailed) or _is_busy_failure(exc):
                    # The transaction failed, or a lock held elsewhere outlasted the full busy
                    # timeout: every read would meet that again alone, each after the same wait.
                    results = [(None, OutboxError(f"outbox read failed: {exc}"))] * len(group)
                else:
                    results = self._each_alone(conn, group)
        self._answer(group, results)

    def _each_alone(
        self, conn: sqlite3.Connection, group: list[_Job]
    ) -> list[tuple[Any, BaseException | None]]:
        """After one read of ``group`` raised (a value the driver cannot bind, say): each read
        in a read transaction of its own, so that only the faulty one fails. As for a write
        group (see :meth:`_commit`), and only on this path: the common one stays a single
        transaction for the group. A read writes nothing, so running it again is safe."""
        results: list[tuple[Any, BaseException | None]] = []
        for index, job in enumerate(group):
            try:
                results.append((_transaction(conn, [job], None, self._busy)[0], None))
            except Exception as exc:
                error = OutboxError(f"outbox read failed: {exc}")
                if isinstance(exc, _GroupFailed) or _is_busy_failure(exc):
                    # Not this read's own fault: those left would meet it too, one after
                    # another, so they fail with it now.
                    results.extend([(None, error)] * (len(group) - index))
                    break
                results.append((None, error))
        return results

    def _commit(self, conn: sqlite3.Connection, lock: int, group: list[_Job]) -> None:
        results: list[tuple[Any, BaseException | None]]
        if not self._still_there():
            self.failure = self._lost
            error = OutboxError(self._lost or "outbox lost")
            self._answer(group, [(None, error)] * len(group))
            return
        if (refused := _refusal(self._files)) is not None:
            self.failure = refused
            self._answer(group, [(None, OutboxError(refused))] * len(group))
            return
        # The longest the group may wait for a lock held elsewhere: the busy timeout from the
        # arrival of its oldest job (one queued behind a failing group gets what is left).
        deadline = min(job.at for job in group) + self._busy_timeout_s
        # Lazy jobs alone need no fsync (see the module docstring); a durable one always does.
        relaxed = not any(job.durable for job in group)
        try:
            if relaxed != self._relaxed:
                try:  # fails closed: a group that cannot have its fsync fails as a whole
                    conn.execute(f"PRAGMA synchronous={'NORMAL' if relaxed else 'FULL'}")
                except sqlite3.Error as exc:
                    raise _GroupFailed(exc) from exc
                self._relaxed = relaxed
            results = [
                (value, None) for value in _transaction(conn, group, lock, self._busy, deadline)
            ]
            self.failure = None
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
                results = [_alone(conn, job, lock, self._busy, deadline) for job in group]
            # Nothing committed (a file turned read-only fails in the first statement, not at
            # the commit): readiness must not say otherwise until a write succeeds.
            failed = [error for _, error in results if error is not None]
            self.failure = str(failed[0]) if len(failed) == len(results) else None
        else:
            # After the commit, and outside the jobs' retry: a hook that raises must not run
            # a committed group's jobs a second time.
            if self._on_commit is not None:
                try:
                    self._on_commit(len(group))
                except Exception:
                    log.exception("outbox commit hook failed (the group is committed)")
        self._answer(group, results)
        # Give the core to the event loop before the next group starts, so that it answers this
        # group first. Otherwise, on a core that the loop and this thread share, the answers
        # wait behind the next group's statements (the loop needs the GIL that those hold), and
        # the clients' next requests arrive later, split into two groups that each pay for an
        # fsync. Answered first, they arrive while this thread waits and form one larger group.
        # Also when nothing is queued yet: right after the commit the loop has not run, so the
        # queue is empty because the next requests are still unread; waiting on it would wake
        # this thread at the first of them, in groups a tenth smaller (bench/README.md, "Issue
        # 20: the writer's wake-ups").
        os.sched_yield()

    def _answer(self, group: list[_Job], results: list[tuple[Any, BaseException | None]]) -> None:
        # One wake-up per event loop for the whole group rather than one per job.
        answers: dict[asyncio.AbstractEventLoop, list[_Answer]] = {}
        for job, (result, error) in zip(group, results, strict=True):
            answers.setdefault(job.loop, []).append((job.future, result, error, job.after))
        for loop, items in answers.items():
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
                loop.call_soon_threadsafe(_resolve_all, items)
