"""Group commit of notifications on PostgreSQL: the accepts of one moment share one commit.

Rule: a request is answered only after the transaction holding its notification has committed
with ``synchronous_commit`` on. The accepts that arrive while every connection is busy, or
within one turn of the event loop, wait together and go as one statement, in one transaction:
one round trip and one WAL flush for all of them, and one multi-row write of their
notifications and of their deliveries rather than one statement each (bench/README.md). Each
is still answered only after its own commit.

At most :data:`IN_FLIGHT` groups commit at once: while they do, the accepts arriving gather into
the next group, which grows with the load (as with the SQLite writer), rather than spreading
over every connection of the pool in small groups that would each pay for a flush, and wait for
each other on the row locks of identical bodies.

A batch of accepts is sorted by digest, so two gateways committing the same bodies at once take
the digests' row locks in one order and never deadlock. When a batch fails for what one
submission can cause (a value the database refuses, a constraint, a limit: :data:`_ITS_OWN`),
each submission runs again alone, so only a faulty one fails, within what is left of the
group's timeout. Any other failure (no answer in time, a connection lost, a server shutting
down) is the database's, not a submission's: the whole group fails at once. Run again one at a
time, each would wait a timeout of its own on a database that does not answer, and a group of
N accepts would get its 503 only after (N + 1) timeouts, long after Meta stopped waiting.

Each group slot keeps the connection it took from the pool for as long as that connection
works: a pool's acquire and release (each a task of its own in asyncpg, for the timeout and the
shield) cost more Python per group than the group's own bookkeeping (bench/README.md). A
connection that failed or closed goes back to the pool, which connects again; the next group
takes a fresh one. A kept connection the server ended while it waited (a restart, a failover,
an idle timeout) is found closed when the next group runs on it: that group runs again, once,
on a fresh connection, rather than failing (a 503 for its accepts, outcomes lost and their
deliveries sent again). Only when running it twice is safe: a committer of ``idempotent`` work
(accepts: one committed twice finds its digest stored and is a duplicate) runs it again
whatever the connection's end cut short; any other (outcomes, each of which counts an attempt)
only when the driver refused the group before sending anything (``InterfaceError``: the
connection already closed or released; ``InternalClientError``: its protocol no longer in a
state to send).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg

from gateway.errors import OutboxError

__all__ = ["FAILURES", "Committer", "pool_failure", "statement_failure"]

log = logging.getLogger(__name__)

# Groups committing at once: two, so that one group's statements run while the other's flush
# is written (measured in bench/README.md, "PostgreSQL outbox").
IN_FLIGHT = 2

# What a database that went away, or a statement that failed, raises through asyncpg.
FAILURES: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)


# Commits a group of submitted argument tuples on a connection, in one transaction; returns
# one result for each, in the group's order.
Run = Callable[[Any, list[tuple[Any, ...]]], Awaitable[Sequence[Any]]]


class Committer:
    """Runs ``run`` on each group of submitted argument tuples, in group commits on ``pool``."""

    def __init__(
        self,
        pool: asyncpg.Pool[Any],
        run: Run,
        *,
        timeout_s: float,
        on_commit: Callable[[int], None] | None = None,
        in_flight: int = IN_FLIGHT,
        ordered: bool = True,
        idempotent: bool = False,
    ) -> None:
        self._pool = pool
        self._run = run
        self._timeout_s = timeout_s
        self._on_commit = on_commit
        self._ordered = ordered
        self._idempotent = idempotent
        self._waiting: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._flushing = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(in_flight)
        # Connections kept between groups, at most one per slot.
        self._kept: list[Any] = []
        self._closing = False

    def submit(self, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        """Queue one execution (with ``ordered``, its first argument orders the batch; else
        the batch keeps the order of submission); the future resolves with its result once its
        group has committed, or raises OutboxError."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting.append((args, future))
        if not self._flushing:
            self._flushing = True
            loop.call_soon(self._start)
        return future

    def _start(self) -> None:
        task = asyncio.create_task(self._flush())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush(self) -> None:
        async with self._slots:
            # While this waits for a slot (or a connection), later submissions join the group.
            kept = self._kept.pop() if self._kept else None
            conn = kept or await self._acquire()
            if conn is None:
                return
            keep = False
            group, self._waiting, self._flushing = self._waiting, [], False
            try:
                try:
                    keep = await self._commit(conn, group, kept=kept is not None)
                except _Ended:
                    await self._give_back(conn)
                    conn = await self._acquire(group)
                    if conn is not None:
                        keep = await self._commit(conn, group)
            except Exception as exc:
                # Whatever the driver raised beyond FAILURES: every submission is answered,
                # none waits for ever (a record that never returns would hold its delivery in
                # flight, never to be claimed again).
                log.exception("outbox group commit failed")
                _fail(group, OutboxError(f"outbox write failed: {_reason(exc)}"))
            finally:
                # None: none to be had after an ended one (the group was answered).
                if conn is not None:
                    if keep and not self._closing and _usable(conn):
                        self._kept.append(conn)
                    else:
                        await self._give_back(conn)

    async def _acquire(self, group: list[tuple[tuple[Any, ...], Any]] | None = None) -> Any | None:
        """A connection from the pool; ``None`` when there is none in time, the group (``None``:
        the submissions waiting) answered with the failure."""
        try:
            return await self._pool.acquire(timeout=self._timeout_s)
        except FAILURES as exc:
            if group is None:
                group, self._waiting, self._flushing = self._waiting, [], False
            reason = pool_failure(self._pool, exc, self._timeout_s)
            _fail(group, OutboxError(f"outbox database unavailable: {reason}"))
            return None

    async def _give_back(self, conn: Any) -> None:
        with contextlib.suppress(*FAILURES):
            await self._pool.release(conn)

    async def _commit(
        self, conn: Any, group: list[tuple[tuple[Any, ...], Any]], kept: bool = False
    ) -> bool:
        """Run ``group`` on ``conn`` and answer each submission; whether ``conn`` ran it
        without a failure (and may be kept for the next group). ``kept``: ``conn`` waited
        since an earlier group; found ended by the server, :class:`_Ended` is raised and
        nothing is answered (the caller runs the group again on a fresh connection)."""
        if self._ordered:
            group.sort(key=lambda item: item[0][0])
        deadline = asyncio.get_running_loop().time() + self._timeout_s
        try:
            rows = await self._run(conn, [args for args, _ in group])
        except Exception as exc:
            if kept and not _usable(conn) and (self._idempotent or isinstance(exc, _UNSENT)):
                raise _Ended from exc
            if not isinstance(exc, FAILURES):
                raise
            if len(group) == 1 or not _usable(conn) or not isinstance(exc, _ITS_OWN):
                reason = statement_failure(exc, self._timeout_s)
                _fail(group, OutboxError(f"outbox write failed: {reason}"))
                return False
            await self._alone(conn, group, deadline)
            return False
        if self._on_commit is not None:
            self._on_commit(len(group))
        for (_, future), row in zip(group, rows, strict=True):
            _answer(future, row)
        return True

    async def _alone(
        self, conn: Any, group: list[tuple[tuple[Any, ...], Any]], deadline: float
    ) -> None:
        """Run each submission of a group that failed for one of them (:data:`_ITS_OWN`) alone,
        and answer it, up to ``deadline`` (the group's own timeout): those left when it has
        passed, or after a failure that is not a submission's own, fail at once."""
        loop = asyncio.get_running_loop()
        for index, (args, future) in enumerate(group):
            left = deadline - loop.time()
            try:
                if left <= 0:
                    raise TimeoutError(f"no answer within {self._timeout_s:g} s")
                # Cancelled at the deadline, the statement is cancelled on the server too.
                rows = await asyncio.wait_for(self._run(conn, [args]), left)
            except FAILURES as alone:
                reason = statement_failure(alone, self._timeout_s)
                error = OutboxError(f"outbox write failed: {reason}")
                if isinstance(alone, _ITS_OWN) and _usable(conn):
                    _answer(future, error=error)
                    continue
                _fail(group[index:], error)
                return
            _answer(future, rows[0])

    async def close(self) -> None:
        """Wait for the groups already started, and give the kept connections back."""
        self._closing = True
        while self._tasks or self._flushing:
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await asyncio.sleep(0)
        kept, self._kept = self._kept, []
        for conn in kept:
            await self._give_back(conn)


# What one submission of a group can cause by itself, so that the others may commit without
# it: the database refused one of its values (class 22, or the driver could not encode it), a
# constraint (class 23) or a limit (class 54). Nothing else is a submission's own.
_ITS_OWN: tuple[type[BaseException], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.ProgramLimitExceededError,
    asyncpg.exceptions._base.DataError,
)

# What asyncpg raises for a statement it never sent: the connection closed or released before
# the call, or its protocol in no state to send.
_UNSENT = (asyncpg.InterfaceError, asyncpg.exceptions._base.InternalClientError)


def _usable(conn: Any) -> bool:
    """Whether ``conn`` is still open: one the server ended is closed, or already released
    to the pool by asyncpg (which then refuses every call on it)."""
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:
        return False


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def statement_failure(exc: BaseException, timeout_s: float) -> str:
    """Why a statement failed, for the operator: asyncpg's timeout says nothing of itself
    (a bare ``TimeoutError``)."""
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"no answer within {timeout_s:g} s"
    return _reason(exc)


def pool_failure(pool: asyncpg.Pool[Any], exc: BaseException, timeout_s: float) -> str:
    """Why ``pool`` gave no connection within ``timeout_s``: every one it may hold was in use
    (more work at once than connections, or each held by a statement the database is slow to
    answer), or a new one could not be made in time; else the failure to connect."""
    if not isinstance(exc, TimeoutError) or str(exc):
        return _reason(exc)
    most = pool.get_max_size()
    if pool.get_size() >= most and pool.get_idle_size() == 0:
        return f"all {most} connections of the pool in use for {timeout_s:g} s"
    return f"no connection to the database within {timeout_s:g} s"


def _answer(
    future: asyncio.Future[Any], result: Any = None, error: Exception | None = None
) -> None:
    if future.done():  # the request went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _fail(group: Sequence[tuple[Any, asyncio.Future[Any]]], error: Exception) -> None:
    for _, future in group:
        _answer(future, error=error)


class _Ended(Exception):
    """A kept connection was found ended by the server: nothing of the group was answered."""
