"""One gateway per outbox file: the lock its owner holds for its lifetime.

Rule: the process that dispatches an outbox (a lone ``serve``, or the supervisor of a
multi-worker gateway on behalf of its workers) holds an exclusive ``flock`` on ``<outbox>.owner``
until it exits, and writes its pid there. A second gateway on the same file is refused at start:
two dispatchers on one outbox would each send every delivery (at-least-once would become
at-least-twice). The kernel releases the lock when the holder dies, however it dies, so a crash
never leaves a stale lock behind. The writers' own per-transaction lock (``<outbox>.lock``, see
:mod:`gateway.outbox.sqlite.writer`) is a different file: sibling workers take that one in turns.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from gateway.errors import OutboxError

__all__ = ["OwnerLock"]


class OwnerLock:
    """Held from construction until :meth:`release` (or the process's end)."""

    def __init__(self, path: Path) -> None:
        # Beside the file the path leads to: a second gateway given another path to the same
        # file through a symbolic link locks the same lock file. (A hard link or a bind mount
        # is another name for the file that no path can tell apart; not the lock on the file
        # itself either: a descriptor of it closed in a process that runs SQLite would drop
        # SQLite's own locks, https://sqlite.org/howtocorrupt.html section 2.2.)
        self.path = Path(f"{path.resolve()}.owner")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise OutboxError(f"outbox.path = '{path}': cannot open {self.path}: {exc}") from exc
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self._fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            self.release()
            raise OutboxError(
                f"outbox.path = '{path}' is in use by another gateway (pid {holder});"
                " stop it first, or give this one an outbox of its own"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None
