"""A consistent copy of the outbox file, taken while the gateway serves.

Rule: the copy is SQLite's online backup (``sqlite3.Connection.backup``) in one step, so it
reads one snapshot inside one read transaction: every notification committed before it began
is in the copy with all of its deliveries, nothing after it is, and the gateway keeps writing
meanwhile (WAL: readers do not block the writer). A plain ``cp`` of the file would miss what
still sits in the ``-wal`` file, or catch a checkpoint half done. The copy is checked
(``PRAGMA quick_check``), written under a temporary name, flushed to disk and only then given
its name, so a file at the destination is always a whole backup.

One thing in the copy differs from the original: its next delivery id. The original goes on
handing out ids after the backup, and a gateway restored from the copy must not hand out the same
ones to other notifications (targets deduplicate on them), so the copy's id sequence starts
:data:`ID_GAP` further on.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import OutboxError

__all__ = ["ID_GAP", "BackupSummary", "backup_file"]

# Further than any gateway gets between a backup and a restore: at 1,000 deliveries a second,
# 31 years. Delivery ids stay far below SQLite's 2**63 row ids all the same.
ID_GAP = 10**12


@dataclass(frozen=True, slots=True)
class BackupSummary:
    """What the copy holds: notifications and deliveries, and the layout version."""

    notifications: int
    deliveries: int
    layout: int


def backup_file(source: Path, destination: Path, *, busy_timeout_s: float) -> BackupSummary:
    """Copy the outbox at ``source`` to the new file ``destination``; raises OutboxError."""
    if destination.exists():
        raise OutboxError(f"{destination} exists; a backup goes to a new file")
    if not source.is_file():
        raise OutboxError(f"outbox.path = '{source}': no outbox file there")
    partial = destination.with_name(f".{destination.name}.partial")
    try:
        # Made here, readable by its owner alone (it holds message bodies, as the outbox does),
        # and only if no other backup is writing it: SQLite would create it with the umask's.
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        raise OutboxError(
            f"'{partial}' exists: another backup to {destination} is being written, or one"
            " that was interrupted left it; remove it if none is running"
        ) from None
    except OSError as exc:
        raise OutboxError(f"cannot create '{partial}': {exc.strerror or exc}") from exc
    try:
        summary = _copy(source, partial, busy_timeout_s)
        _flush(partial)
        _give_name(partial, destination)
        _flush(destination.parent)
    except (OSError, sqlite3.Error) as exc:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise OutboxError(f"backup of '{source}' to '{destination}' failed: {exc}") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise
    return summary


def _copy(source: Path, partial: Path, busy_timeout_s: float) -> BackupSummary:
    # Not mode=ro: a read-only connection cannot open a WAL file whose -shm is missing.
    with contextlib.closing(sqlite3.connect(source, timeout=busy_timeout_s)) as src:
        layout = int(src.execute("PRAGMA user_version").fetchone()[0])
        if layout == 0:
            raise OutboxError(f"outbox.path = '{source}': not an outbox file (no layout)")
        with contextlib.closing(sqlite3.connect(partial)) as copy:
            src.backup(copy)  # all pages in one step: one snapshot
            (check,) = copy.execute("PRAGMA quick_check").fetchone()
            if check != "ok":
                raise OutboxError(f"the copy of '{source}' failed its check: {check}")
            _skip_ids(copy)
            (notifications,) = copy.execute("SELECT count(*) FROM notifications").fetchone()
            (deliveries,) = copy.execute("SELECT count(*) FROM deliveries").fetchone()
    return BackupSummary(int(notifications), int(deliveries), layout)


def _skip_ids(copy: sqlite3.Connection) -> None:
    # The deliveries table is AUTOINCREMENT: its next id is sqlite_sequence's value plus one.
    with copy:
        moved = copy.execute(
            "UPDATE sqlite_sequence SET seq = seq + ? WHERE name = 'deliveries'", (ID_GAP,)
        ).rowcount
        if not moved:  # no delivery yet: the original's first ids are ahead too
            copy.execute(
                "INSERT INTO sqlite_sequence (name, seq) VALUES ('deliveries', ?)", (ID_GAP,)
            )


def _give_name(partial: Path, destination: Path) -> None:
    """Name the finished copy: a link, which fails rather than replace a file made meanwhile;
    a rename on a file system without links (FAT, some network shares)."""
    try:
        os.link(partial, destination)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if destination.exists():
            raise FileExistsError(errno.EEXIST, "File exists", str(destination)) from exc
        os.replace(partial, destination)
    else:
        partial.unlink()


def _flush(path: Path) -> None:
    """fsync a file, or a folder (so a rename in it is durable)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
