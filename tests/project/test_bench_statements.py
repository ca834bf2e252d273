"""The statement timer of the drain benchmark (bench/statements.py) counts each statement of the
real SQLite outbox with its calls and rows, while the outbox reads its rows as it always does."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from repo_scripts import load_script

from gateway.outbox import Route
from gateway.outbox.sqlite import layout, store


@pytest.fixture
def statements() -> Iterator[ModuleType]:
    module = load_script("bench/statements.py", "bench_statements")
    module.install()
    try:
        yield module
    finally:
        module.uninstall()


def _named(spent: dict[str, list[int]], start: str) -> list[int]:
    (figures,) = [figures for sql, figures in spent.items() if sql.startswith(start)]
    return figures


def test_each_statement_of_the_outbox_is_timed_with_its_calls_and_rows(
    statements: ModuleType, tmp_path: Path
) -> None:
    """Two notifications stored and claimed through the outbox's own statements, on a file
    opened while the timer is installed: the claim still hands out both deliveries, and the
    timer names the insert (one call per delivery) and the read of bodies (two rows)."""
    conn, prefix = layout.open_store(tmp_path / "outbox.sqlite3")
    try:
        statements.reset()
        for n in range(2):
            conn.execute("BEGIN IMMEDIATE")
            body = b'{"n":%d}' % n
            stored = store.insert_notification(
                conn, hashlib.sha256(body).digest(), 0.0, 1.0, "sha256=00", body, [Route("t", None)]
            )
            conn.execute("COMMIT")
            assert stored is not None
        due, damaged = store.due_deliveries(conn, prefix, 2.0, {"t": 10}, skip=())
    finally:
        conn.close()
    assert [delivery.body for delivery in due] == [b'{"n":0}', b'{"n":1}']
    assert damaged == []
    spent = statements.snapshot()
    calls, nanoseconds, rows = _named(spent, "INSERT INTO deliveries")
    assert (calls, rows) == (2, 0)
    assert nanoseconds > 0
    calls, _, rows = _named(spent, "SELECT d.id, d.notification_id")
    assert (calls, rows) == (1, 2)
    lines = statements.per_delivery(spent, delivered=2, top=3)
    assert lines[0].endswith("every statement")
    assert len(lines) == 4


def test_uninstalled_the_timer_leaves_new_connections_plain(statements: ModuleType) -> None:
    statements.uninstall()
    conn = sqlite3.connect(":memory:")
    try:
        assert type(conn) is sqlite3.Connection
    finally:
        conn.close()
