"""The writer's decision to make a lone notification wait for company, and its waits for a lock
held outside the gateway (gateway.outbox.sqlite.writer)."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.errors import OutboxError
from gateway.outbox.sqlite.writer import (
    LAZY_WAIT_S,
    LINGER_MAX_S,
    PATIENT_WAIT_S,
    Writer,
    lazy_deadline,
    linger_for,
)


@pytest.mark.parametrize(
    ("durable_jobs", "average_gap_s", "expected"),
    [
        pytest.param(1, None, 0.0, id="no history yet: commit at once"),
        pytest.param(1, 0.010, 0.0, id="notifications rare: commit at once"),
        pytest.param(1, LINGER_MAX_S * 1.01, 0.0, id="gap just over the limit"),
        pytest.param(1, 0.001, 0.0015, id="steady 1 ms gaps: wait a little over one"),
        pytest.param(1, 0.0019, LINGER_MAX_S, id="the wait never exceeds the limit"),
        pytest.param(2, 0.001, 0.0, id="a group already shares its commit"),
        pytest.param(40, 0.0001, 0.0, id="busy: groups are large without waiting"),
        pytest.param(0, 0.001, 0.0, id="no notification in the group"),
    ],
)
def test_linger_for(durable_jobs: int, average_gap_s: float | None, expected: float) -> None:
    assert linger_for(durable_jobs, average_gap_s) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("deadline", "waits", "expected"),
    [
        pytest.param(None, [LAZY_WAIT_S], 10.0 + LAZY_WAIT_S, id="an outcome waits its wait"),
        pytest.param(None, [PATIENT_WAIT_S], 10.0 + PATIENT_WAIT_S, id="a patient one, longer"),
        pytest.param(
            None, [PATIENT_WAIT_S, LAZY_WAIT_S], 10.0 + LAZY_WAIT_S, id="the most hurried sets it"
        ),
        pytest.param(10.02, [LAZY_WAIT_S], 10.0 + LAZY_WAIT_S, id="a hurried one brings it on"),
        pytest.param(10.001, [PATIENT_WAIT_S], 10.001, id="a patient one never puts it off"),
        pytest.param(10.003, [], 10.003, id="nothing new: unchanged"),
        pytest.param(None, [], 10.0, id="nothing at all: now"),
    ],
)
def test_lazy_deadline(deadline: float | None, waits: list[float], expected: float) -> None:
    assert lazy_deadline(deadline, 10.0, waits) == pytest.approx(expected)


def _table(at: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(at, isolation_level=None, check_same_thread=False)
    conn.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER)")
    return conn


@pytest.mark.parametrize(
    ("patient", "at_least_s"),
    [(False, LAZY_WAIT_S), (True, PATIENT_WAIT_S)],
    ids=["an outcome", "a patient outcome"],
)
async def test_a_lazy_job_alone_waits_its_whole_wait_for_company(
    tmp_path: Path, patient: bool, at_least_s: float
) -> None:
    """A lazy job with nothing beside it commits only once it has waited as long as it may
    (a patient one longer), and one durable job arriving meanwhile takes it along at once."""
    sizes: list[int] = []
    writer = Writer(tmp_path / "lazy.sqlite3", _table, on_commit=sizes.append)
    wait_s = PATIENT_WAIT_S if patient else LAZY_WAIT_S
    try:
        started = time.monotonic()
        await writer.submit(
            lambda conn: conn.execute("INSERT INTO t VALUES (1)"), durable=False, wait_s=wait_s
        )
        assert time.monotonic() - started >= at_least_s
        lazy = writer.submit(
            lambda conn: conn.execute("INSERT INTO t VALUES (2)"), durable=False, wait_s=60.0
        )
        await asyncio.sleep(0.01)
        await writer.submit(lambda conn: conn.execute("INSERT INTO t VALUES (3)"))
        await asyncio.wait_for(lazy, 10)
    finally:
        await writer.close()
    assert sizes == [1, 2]


async def test_a_read_waits_for_a_lock_held_outside_the_gateway_after_a_write(
    tmp_path: Path,
) -> None:
    """Writes begin with no busy wait (the workers queue on their own lock); a read that then
    meets a lock another process holds still waits up to the busy timeout, and gets its answer
    once the lock is gone. (The outbox's WAL file lets readers past any lock but a recovery;
    a file in rollback-journal mode, where an exclusive lock stops readers, shows the wait.)"""
    path = tmp_path / "journal.sqlite3"

    def open_connection(at: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(at, isolation_level=None, timeout=5.0)
        conn.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER)")
        return conn

    writer = Writer(path, open_connection, busy_timeout_s=5.0)
    try:
        await writer.submit(lambda conn: conn.execute("INSERT INTO t VALUES (1)"))
        script = (
            "import sqlite3, sys, time\n"
            f"conn = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
            "conn.execute('BEGIN EXCLUSIVE')\n"
            "print('locked', flush=True)\n"
            "time.sleep(0.5)\n"
            "conn.execute('COMMIT')\n"
        )
        holder = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE
        )
        assert holder.stdout is not None
        assert await holder.stdout.readline() == b"locked\n"
        started = time.monotonic()
        count = await writer.submit(
            lambda conn: conn.execute("SELECT count(*) FROM t").fetchone()[0], read=True
        )
        waited = time.monotonic() - started
        await holder.wait()
    finally:
        await writer.close()
    assert count == 1
    assert waited < 5.0


def _synchronous(conn: sqlite3.Connection) -> int:
    """The level the job's own transaction commits with: 1 NORMAL, 2 FULL."""
    conn.execute("INSERT INTO t VALUES (1)")
    return int(conn.execute("PRAGMA synchronous").fetchone()[0])


@pytest.mark.parametrize(
    ("groups", "expected"),
    [
        pytest.param([[True]], [[2]], id="an accept: fsync"),
        pytest.param([[False]], [[1]], id="an outcome alone: no fsync of its own"),
        pytest.param([[False, True]], [[2, 2]], id="an outcome beside an accept: fsync"),
        pytest.param([[False], [True], [False]], [[1], [2], [1]], id="each group on its own merit"),
    ],
)
async def test_a_group_of_outcomes_alone_commits_without_an_fsync_and_an_accept_with_one(
    tmp_path: Path, groups: list[list[bool]], expected: list[list[int]]
) -> None:
    """Durable jobs (accepts) commit with synchronous=FULL; a group of lazy jobs alone
    (outcomes of attempts, whose loss only means a resend) with NORMAL."""
    path = tmp_path / "outbox.sqlite3"

    def open_connection(at: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(at, isolation_level=None, timeout=5.0)
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER)")
        return conn

    writer = Writer(path, open_connection, busy_timeout_s=5.0)
    try:
        seen = []
        for group in groups:  # submitted in one turn of the loop: one group
            futures = [writer.submit(_synchronous, durable=durable) for durable in group]
            seen.append(list(await asyncio.gather(*futures)))
    finally:
        await writer.close()
    assert seen == expected


async def test_a_jobs_after_step_makes_its_result_and_its_failure_fails_that_job_alone(
    tmp_path: Path,
) -> None:
    """Three jobs committed in one group: ``after`` turns one's result on the event loop's
    thread, an ``after`` that raises fails its own future only, and the third is untouched."""

    def open_connection(at: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(at, isolation_level=None, check_same_thread=False)
        conn.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER)")
        return conn

    def broken(rowid: int) -> int:
        raise ValueError(f"cannot make a delivery of row {rowid}")

    def insert(n: int) -> Callable[[sqlite3.Connection], int | None]:
        return lambda conn: conn.execute("INSERT INTO t VALUES (?)", (n,)).lastrowid

    writer = Writer(tmp_path / "after.sqlite3", open_connection)
    try:
        loop = asyncio.get_running_loop()
        seen: list[object] = []

        def doubled(rowid: int) -> int:
            seen.append(asyncio.get_running_loop())  # raises off the loop's thread
            return rowid * 2

        made = writer.submit(insert(1), after=doubled)
        failed = writer.submit(insert(2), after=broken)
        plain = writer.submit(insert(3))
        assert await made == 2
        with pytest.raises(ValueError, match="row 2"):
            await failed
        assert await plain == 3
        assert seen == [loop]
        assert (
            await writer.submit(
                lambda conn: conn.execute("SELECT count(*) FROM t").fetchone()[0], read=True
            )
            == 3
        )
    finally:
        await writer.close()


class _Recorder:
    """A Settles that acts at once: it records what it is settled with, and in which order
    against the loop's turns; ``failing``: its set_result raises, as a buggy answer would."""

    def __init__(self, log: list[object], name: str, *, failing: bool = False) -> None:
        self.log = log
        self.name = name
        self.failing = failing
        self.settled = asyncio.Event()

    def done(self) -> bool:
        return self.settled.is_set()

    def set_result(self, result: object, /) -> None:
        self.settled.set()
        self.log.append((self.name, result))
        if self.failing:
            raise RuntimeError("an answer that fails")

    def set_exception(self, exception: BaseException, /) -> None:
        self.settled.set()
        self.log.append((self.name, type(exception).__name__))


async def test_a_job_submitted_into_its_own_settles_is_settled_in_the_commits_turn(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """submit_into settles the caller's object right after ``after``, in the same turn of the
    loop (a future's done callback would run one turn later); one that raises is logged and
    the rest of its group is settled all the same."""

    def open_connection(at: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(at, isolation_level=None, check_same_thread=False)
        conn.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER)")
        return conn

    writer = Writer(tmp_path / "into.sqlite3", open_connection)
    log: list[object] = []
    loop = asyncio.get_running_loop()

    def after(rowid: int) -> int:
        log.append(("after", rowid))
        loop.call_soon(log.append, "next turn")
        return rowid * 10

    def insert(n: int) -> Callable[[sqlite3.Connection], int | None]:
        return lambda conn: conn.execute("INSERT INTO t VALUES (?)", (n,)).lastrowid

    first, second = _Recorder(log, "first", failing=True), _Recorder(log, "second")
    try:
        writer.submit_into(insert(1), first, after=after)  # one turn: one group
        writer.submit_into(insert(2), second)
        await asyncio.wait_for(second.settled.wait(), 10)
        await asyncio.sleep(0)
    finally:
        await writer.close()
    assert log == [("after", 1), ("first", 10), ("second", 2), "next turn"]
    assert "settling a committed job failed" in caplog.text


async def test_turns_handed_over_while_a_group_commits_form_the_next_group_together(
    tmp_path: Path,
) -> None:
    """Jobs handed over in three turns of the loop while the writer is inside a transaction are
    all taken for the next group (the queue drained to the last turn), and a writer whose
    thread has ended refuses new jobs."""
    sizes: list[int] = []

    def open_connection(at: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(at, isolation_level=None, check_same_thread=False)
        conn.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER)")
        return conn

    def insert(n: int) -> Callable[[sqlite3.Connection], object]:
        return lambda conn: conn.execute("INSERT INTO t VALUES (?)", (n,))

    started, release = threading.Event(), threading.Event()

    def held(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t VALUES (0)")
        started.set()
        release.wait(10)

    writer = Writer(tmp_path / "turns.sqlite3", open_connection, on_commit=sizes.append)
    try:
        first = writer.submit(held)
        await asyncio.to_thread(started.wait, 10)
        later = []
        for n in range(1, 4):  # one hand-over per turn of the loop
            later.append(writer.submit(insert(n)))
            await asyncio.sleep(0)
        release.set()
        await asyncio.gather(first, *later)
        assert sizes == [1, 3]
    finally:
        release.set()
        await writer.close()
    with pytest.raises(OutboxError, match="closed"):
        writer.submit(insert(9))


def _broken_driver(path: Path) -> sqlite3.Connection:
    raise RuntimeError("a driver's own failure, not an OutboxError")


async def test_a_connection_that_fails_with_any_error_fails_the_start_instead_of_hanging_it(
    tmp_path: Path,
) -> None:
    """An error outside the outbox's own while the writer thread opens the file reaches the
    constructor as an OutboxError naming the path: the gateway refuses to start, it does not
    wait for ever."""
    path = tmp_path / "outbox.sqlite3"
    with pytest.raises(OutboxError, match=r"outbox.path = .*cannot open: RuntimeError"):
        await asyncio.wait_for(asyncio.to_thread(Writer, path, _broken_driver), timeout=10)


async def test_a_commit_hook_that_raises_runs_no_job_of_its_committed_group_again(
    tmp_path: Path,
) -> None:
    """Two inserts committed as one group, and a commit hook (the gateway's counts its groups)
    that raises after that commit: each insert ran once and each job is answered with its own
    result. (The hook used to run inside the jobs' retry: the committed group's jobs ran a
    second time, each alone.)"""
    started, release = threading.Event(), threading.Event()
    hooked: list[int] = []

    def hook(size: int) -> None:
        hooked.append(size)
        if size == 2:
            raise OSError("No space left on device")

    def held(conn: sqlite3.Connection) -> None:
        started.set()
        release.wait(10)

    def insert(conn: sqlite3.Connection) -> int:
        return int(conn.execute("INSERT INTO t VALUES (1)").lastrowid or 0)

    writer = Writer(tmp_path / "hook.sqlite3", _table, on_commit=hook)
    try:
        first = writer.submit(held)
        await asyncio.to_thread(started.wait, 10)
        both = [writer.submit(insert), writer.submit(insert)]
        release.set()
        await first
        assert sorted(await asyncio.gather(*both)) == [1, 2]
        count = await writer.submit(lambda conn: conn.execute("SELECT count(*) FROM t").fetchone())
    finally:
        release.set()
        await writer.close()
    assert count == (2,)
    assert 2 in hooked


@pytest.mark.parametrize(
    ("committed", "seen_elsewhere"),
    [(True, [1]), (False, [])],
    ids=["a read of committed rows: after the commit", "a plain read: inside the transaction"],
)
async def test_a_read_of_committed_rows_queued_with_a_write_runs_after_its_commit(
    tmp_path: Path, committed: bool, seen_elsewhere: list[int]
) -> None:
    """A read asked to see committed rows only (the dispatcher's claim, whose lineup keeps
    what it reads), queued in the same turn as a write, runs after that write has committed:
    another connection sees the row then too. A plain read rides in the write's transaction,
    where the row is not committed yet (and could still be rolled back)."""
    path = tmp_path / "committed.sqlite3"
    writer = Writer(path, _table)

    def read(conn: sqlite3.Connection) -> tuple[list[int], list[int]]:
        here = [n for (n,) in conn.execute("SELECT n FROM t")]
        other = sqlite3.connect(path)
        try:
            elsewhere = [n for (n,) in other.execute("SELECT n FROM t")]
        finally:
            other.close()
        return here, elsewhere

    try:
        write = writer.submit(lambda conn: conn.execute("INSERT INTO t VALUES (1)"))
        seen = writer.submit(read, read=True, committed=committed)
        await asyncio.wait_for(write, 10)
        here, elsewhere = await asyncio.wait_for(seen, 10)
    finally:
        await writer.close()
    assert here == [1]
    assert elsewhere == seen_elsewhere
