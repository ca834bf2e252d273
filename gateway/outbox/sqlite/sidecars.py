"""A look at the outbox file that leaves nothing beside it that it did not find there.

Rule: a command that only reads the outbox file (``waba-gateway check``) leaves its folder as
it found it. SQLite reads a file in WAL mode through a log (``<outbox>-wal``) and a
shared-memory index (``<outbox>-shm``) beside it, and makes both when they are missing, even
for a read-only connection, which then cannot remove them: they go only with the checkpoint the
last connection makes as it closes, and a checkpoint writes. Left behind, they belong to whoever
ran the command (root's are given to the database file's owner by SQLite itself; any other
user's stay that user's, with the database file's mode), and a gateway running as the service
user, which must write the index even to read, may then fail to open its own outbox.

What the look made is handed back to SQLite's own clean-up, never removed by name: a connection
that may write opens the file, reads, and closes. Closing, SQLite checkpoints and removes the
log and the index only if it can take the exclusive lock on the database file, which the shared
lock held by every other connection that has read the file forbids; and while it holds that
lock no other connection can begin to read, so none starts using them in between (it waits, and
then makes them anew). Hence:

- only when neither was there before the look: then no connection had the file open, and the
  last one to close had checkpointed its log into it. A log or an index that was there already
  (a gateway running, or one that stopped without closing: its log holds commits not yet in the
  file) is never touched, nor its missing twin, should the look have made one;
- a gateway (or a ``deliveries`` command) that opened the file during the look keeps both, and
  they are then its own to use; one that came and went already took them with it;
- a user who may only read the file cannot checkpoint: what the look made stays, as it would
  have without this.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

__all__ = ["as_found"]

# SQLite names them after the database file it opens.
_SUFFIXES = ("-wal", "-shm")
# A lock on the file outlasting this means another connection is busy with it (a gateway
# recovering its log at start): that connection then keeps the files, so there is nothing to
# wait for.
_BUSY_TIMEOUT_S = 1.0


def _beside(path: Path) -> list[str]:
    """The names of the log and the index beside ``path`` that exist now."""
    return [name for name in (f"{path}{suffix}" for suffix in _SUFFIXES) if os.path.lexists(name)]


@contextlib.contextmanager
def as_found(path: Path) -> Iterator[None]:
    """Around a read-only look at the outbox file ``path``: when neither its ``-wal`` nor its
    ``-shm`` was there before, those the look made are handed back to SQLite after it (see
    the module's docstring), also when the look raises."""
    # Resolved as the look resolves it: SQLite names the files after the file a link leads to.
    real = path.resolve()
    found = _beside(real)
    try:
        yield
    finally:
        if not found and _beside(real):
            _close_as_last(real)


def _close_as_last(path: Path) -> None:
    """Open ``path`` to write (never making it: ``mode=rw``), read, and close; SQLite removes
    the log and the index if this was the last connection to the file. Nothing is reported:
    what SQLite does not remove is in use, or not this user's to remove."""
    with contextlib.suppress(sqlite3.Error):
        conn = sqlite3.connect(
            f"{path.as_uri()}?mode=rw", uri=True, isolation_level=None, timeout=_BUSY_TIMEOUT_S
        )
        try:
            # A read opens the log: SQLite closes (and removes) only a log it has open.
            conn.execute("PRAGMA user_version").fetchone()
        finally:
            conn.close()
