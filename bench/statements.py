"""The CPU each SQL statement of the SQLite outbox costs a draining dispatcher: per statement
text, its calls, the rows it returned and the CPU time of the thread that ran it (the outbox's
writer), stepping included.

Rule: a bench tool, never imported by the gateway (``bench/drain.py --statements``).
``install()`` makes every connection opened after it (``sqlite3.connect``, looked up at each
call, as the outbox opens its file) a subclass of ``sqlite3.Connection`` that times
``execute`` and ``executemany``. A ``SELECT``'s rows are fetched inside the timing, so that
what SQLite does while the caller iterates is counted with its statement; the caller then
reads them from a list. The timing costs about a microsecond per statement, in every mode
alike.

Why a bench needs it: the ordered drain's writer thread spends more per delivery than the
unordered one's, and the thread's total does not say whether the reads of a claim, the records
of outcomes or their commits take it (``bench/README.md``, "Issue 22: what each statement of an
ordered drain costs").
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["install", "per_delivery", "reset", "snapshot", "uninstall"]

# Per statement (its text, white space collapsed): [calls, nanoseconds, rows returned].
_spent: dict[str, list[int]] = {}
# sqlite3.connect as it was before install().
_connect: list[Callable[..., sqlite3.Connection]] = []


def _name(sql: str) -> str:
    return " ".join(sql.split())


class _Rows:
    """A cursor's rows read ahead, for a caller that iterates or fetches them."""

    def __init__(self, cursor: sqlite3.Cursor, rows: list[Any]) -> None:
        self._rows = rows
        self.lastrowid = cursor.lastrowid
        self.rowcount = cursor.rowcount
        self.description = cursor.description

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)

    def fetchone(self) -> Any:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[Any]:
        return self._rows


class _Timed(sqlite3.Connection):
    def execute(self, sql: str, parameters: Any = (), /) -> Any:
        start = time.thread_time_ns()
        cursor = super().execute(sql, parameters)
        rows = cursor.fetchall() if cursor.description is not None else []
        _add(sql, time.thread_time_ns() - start, 1, len(rows))
        return _Rows(cursor, rows)

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> Any:
        rows = list(parameters)
        start = time.thread_time_ns()
        cursor = super().executemany(sql, rows)
        _add(sql, time.thread_time_ns() - start, len(rows), 0)
        return cursor


def _add(sql: str, spent_ns: int, calls: int, rows: int) -> None:
    found = _spent.setdefault(_name(sql), [0, 0, 0])
    found[0] += calls
    found[1] += spent_ns
    found[2] += rows


def install() -> None:
    """Time every statement of the connections opened from now on."""
    if _connect:
        return
    connect = sqlite3.connect
    _connect.append(connect)

    def timed_connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        kwargs.setdefault("factory", _Timed)
        conn: sqlite3.Connection = connect(*args, **kwargs)
        return conn

    sqlite3.connect = timed_connect  # type: ignore[assignment]


def uninstall() -> None:
    """Connections opened from now on are plain ones again."""
    if _connect:
        sqlite3.connect = _connect.pop()  # type: ignore[assignment]


def reset() -> None:
    """Forget what was timed so far (the opening of the file, for one)."""
    _spent.clear()


def snapshot() -> dict[str, list[int]]:
    return {sql: list(figures) for sql, figures in _spent.items()}


def per_delivery(spent: dict[str, list[int]], delivered: int, top: int = 10) -> list[str]:
    """The ``top`` statements by CPU, one line each: microseconds per delivery, calls, rows
    per call and the statement's first words; and the total over every statement."""
    total = sum(ns for _, ns, _ in spent.values())
    lines = [f"{total / 1e3 / delivered:6.2f} us per delivery, every statement"]
    for sql, (calls, ns, rows) in sorted(spent.items(), key=lambda item: -item[1][1])[:top]:
        lines.append(
            f"{ns / 1e3 / delivered:6.2f} us per delivery, {calls:6d} calls,"
            f" {rows / max(calls, 1):7.1f} rows per call: {sql[:80]}"
        )
    return lines
