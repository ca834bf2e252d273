"""A look at the outbox file leaves beside it only what it found there
(gateway.outbox.sqlite.sidecars around gateway.outbox.sqlite.layout.describe).

The outbox here is held by another process, as a gateway holds it: SQLite's locks between
processes, not between the connections of one, decide what its clean-up removes.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.edge.routing import Route
from gateway.errors import OutboxError
from gateway.outbox.sqlite import layout
from gateway.outbox.sqlite.outbox import SqliteOutbox
from gateway.outbox.sqlite.sidecars import as_found

SIG = "sha256=" + "0" * 64

# A gateway's hold on the outbox, in a process of its own: each line on stdin is a command,
# each answered with one line. "accept": store one more notification; "close": close the
# outbox and exit; "crash": exit without closing, as a killed gateway does.
_HOLDER = """
import asyncio, os, sys
from pathlib import Path
from gateway.edge.routing import Route
from gateway.outbox.sqlite.outbox import SqliteOutbox

async def main() -> None:
    box = SqliteOutbox(Path(sys.argv[1]), dedup_window_s=3600)
    print("open", flush=True)
    n = 100
    for line in sys.stdin:
        command = line.strip()
        if command == "accept":
            n += 1
            await box.accept(b'{"n":%d}' % n, "sha256=" + "0" * 64, [Route("sink", None)], n)
            print("stored", flush=True)
        elif command == "crash":
            os._exit(0)
        elif command == "close":
            break
    await box.close()
    print("closed", flush=True)

asyncio.run(main())
"""


class Holder:
    """A process holding the outbox open (see ``_HOLDER``)."""

    def __init__(self, path: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._answer() == "open"

    def _answer(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip()

    def tell(self, command: str) -> str:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{command}\n")
        self.process.stdin.flush()
        return self._answer()

    def end(self, command: str) -> None:
        """``close`` or ``crash``, then wait for the process to exit."""
        self.tell(command)
        self.process.wait(timeout=30)
        self.release()

    def release(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    started: list[Holder] = []
    yield started
    for holder in started:
        holder.release()


def _seed(path: Path, count: int = 1) -> None:
    """An outbox with ``count`` notifications, closed as a stopped gateway leaves it."""

    async def seed() -> None:
        box = SqliteOutbox(path, dedup_window_s=3600)
        try:
            for n in range(count):
                body = b'{"n":%d}' % n
                await box.accept(body, SIG, [Route("sink", None)], float(n + 1))
        finally:
            await box.close()

    asyncio.run(seed())


def _beside(path: Path) -> dict[str, tuple[int, int]]:
    """The log and index beside ``path``: name -> (inode, size)."""
    found = {}
    for suffix in ("-wal", "-shm"):
        name = f"{path}{suffix}"
        if os.path.exists(name):
            stat = os.stat(name)
            found[suffix] = (stat.st_ino, stat.st_size)
    return found


def _notifications(path: Path) -> int:
    """How many notifications the outbox holds, read as the gateway would (log included)."""
    conn = layout.connect(path)
    try:
        return int(conn.execute("SELECT count(*) FROM notifications").fetchone()[0])
    finally:
        conn.close()


def _look(path: Path) -> str:
    with as_found(path):
        return layout.describe(path)


def test_a_look_at_an_outbox_no_one_has_open_leaves_nothing_beside_it(tmp_path: Path) -> None:
    """Stopped gateway: the file alone. The look reports it and leaves no -wal or -shm, and
    not a byte of the file changed."""
    path = tmp_path / "outbox.sqlite3"
    _seed(path)
    assert _beside(path) == {}
    before = path.read_bytes()
    assert "layout 8, intact (quick_check), 1 pending, 0 dead" in _look(path)
    assert _beside(path) == {}
    assert path.read_bytes() == before


def test_a_look_through_a_link_leaves_nothing_beside_the_file_it_leads_to(
    tmp_path: Path,
) -> None:
    """outbox.path a symbolic link: SQLite names the log after the file the link leads to,
    and nothing is left there either."""
    (tmp_path / "data").mkdir()
    real = tmp_path / "data" / "outbox.sqlite3"
    _seed(real)
    link = tmp_path / "outbox.sqlite3"
    link.symlink_to(real)
    assert "1 pending" in _look(link)
    assert _beside(real) == {}
    assert _beside(link) == {}


def test_a_look_that_refuses_the_file_leaves_nothing_beside_it_either(tmp_path: Path) -> None:
    """A WAL file that is no outbox: the look raises, and still leaves no -wal or -shm."""
    path = tmp_path / "other.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE other (n INTEGER)")
    conn.commit()
    conn.close()
    assert _beside(path) == {}
    with pytest.raises(OutboxError, match="not an outbox"):
        _look(path)
    assert _beside(path) == {}


def test_a_look_beside_a_running_gateway_leaves_its_files_as_they_are(
    tmp_path: Path, holders: list[Holder]
) -> None:
    """A gateway has the outbox open: its -wal and -shm are the same files after the look,
    and it goes on storing notifications in them."""
    path = tmp_path / "outbox.sqlite3"
    _seed(path)
    holder = Holder(path)
    holders.append(holder)
    assert holder.tell("accept") == "stored"
    before = _beside(path)
    assert set(before) == {"-wal", "-shm"}
    assert "2 pending" in _look(path)
    assert {suffix: ino for suffix, (ino, _) in _beside(path).items()} == {
        suffix: ino for suffix, (ino, _) in before.items()
    }
    assert holder.tell("accept") == "stored"
    holder.end("close")
    assert _notifications(path) == 3


def test_a_gateway_that_opens_the_outbox_during_the_look_keeps_its_files(
    tmp_path: Path, holders: list[Holder]
) -> None:
    """No one had the file open when the look began; a gateway opens it before the look ends:
    SQLite's clean-up sees it and removes nothing, and what it stores after the look is in
    the file once it closes."""
    path = tmp_path / "outbox.sqlite3"
    _seed(path)
    with as_found(path):
        assert "1 pending" in layout.describe(path)
        holder = Holder(path)
        holders.append(holder)
        assert holder.tell("accept") == "stored"
    assert set(_beside(path)) == {"-wal", "-shm"}
    assert holder.tell("accept") == "stored"
    holder.end("close")
    assert _notifications(path) == 3


def test_a_look_after_a_crash_leaves_the_log_it_found_untouched(
    tmp_path: Path, holders: list[Holder]
) -> None:
    """A gateway killed with commits still in its log: the look leaves that log and the
    index exactly as they were, and the file too; the next start finds every commit."""
    path = tmp_path / "outbox.sqlite3"
    _seed(path)
    holder = Holder(path)
    holders.append(holder)
    assert holder.tell("accept") == "stored"
    holder.end("crash")
    wal = Path(f"{path}-wal")
    assert wal.stat().st_size > 0
    before = (path.read_bytes(), wal.read_bytes(), _beside(path))
    _look(path)
    assert (path.read_bytes(), wal.read_bytes(), _beside(path)) == before
    assert _notifications(path) == 2
