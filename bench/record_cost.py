#!/usr/bin/env python3
"""What recording a drained delivery's outcome costs the SQLite outbox, by how the backlog is
keyed and how the outcomes are grouped into commits: CPU (user and system) and bytes written
per outcome, the outbox's own statements on a file of its own layout, no dispatcher.

Rule: a bench tool. Each variant records every delivery of a fresh copy of one stored backlog
as delivered, ``--per`` outcomes per transaction, committed as the writer commits a group of
outcomes alone (``synchronous=NORMAL``, WAL, ``wal_autocheckpoint`` as the outbox sets it):

  unkeyed        a backlog stored for an unordered target (no conversation key), in id order:
                 what an ``order = "none"`` drain records
  keyed-steps    the same notifications keyed by conversation (digests, as the edge keys them),
                 recorded as an ordered drain's runs go: each commit holds the next step of
                 ``--wave`` conversations
  keyed-runs     the same, each commit holding whole runs of ``--run`` deliveries of fewer
                 conversations (the outcomes of a run recorded together)
  keyed-noindex  keyed-steps on a copy without the place index (``deliveries_place``): what the
                 index alone costs (layouts 7 and before: layout 8 has no such index, and
                 keyed-steps is this already)
  keyed-integer  keyed-steps with each key's first 64 bits stored as an integer (a smaller
                 index entry; the copy is vacuumed after the change, so its pages are packed)
  keyed-everyplace  keyed-steps with the place index holding every keyed delivery, pending or
                 not, and no due time (vacuumed): an index a record does not change

Rounds alternate the variants; the summary gives each one's median and [min..max].

    python bench/record_cost.py --payload "$SHARED/payload.json" --count 20000 \\
        --conversations 2000 --rounds 4
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import counts
from drain import copy_outbox, store

from gateway.outbox.sqlite import layout
from gateway.outbox.sqlite import store as statements


def _copy(source: Path, folder: Path) -> Path:
    folder.mkdir(parents=True)
    copy_outbox(source, folder / "outbox.sqlite3")
    return folder / "outbox.sqlite3"


def _steps(rows: list[tuple[int, str | None]], wave: int, run: int) -> list[int]:
    """Delivery ids in the order an ordered drain records them: ``wave`` conversations at a
    time, one step of each per group; ``run`` > 0: whole runs of that many per group."""
    by_key: dict[str | None, list[int]] = {}
    for rowid, key in rows:
        by_key.setdefault(key, []).append(rowid)
    keys = list(by_key)
    ordered: list[int] = []
    for start in range(0, len(keys), wave):
        chunk = keys[start : start + wave]
        if run:
            for first in range(0, max(len(by_key[k]) for k in chunk), run):
                for key in chunk:
                    ordered.extend(by_key[key][first : first + run])
            continue
        step = 0
        while got := [by_key[k][step] for k in chunk if step < len(by_key[k])]:
            ordered.extend(got)
            step += 1
    return ordered


def measure(
    path: Path, order: Callable[[sqlite3.Connection], list[int]], per: int
) -> dict[str, float]:
    conn, _ = layout.open_store(path)
    conn.execute("PRAGMA synchronous=NORMAL")  # as the writer commits outcomes alone
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    ids = order(conn)
    now = time.time()
    before_io, before = counts.io_counts(), time.process_time()
    for start in range(0, len(ids), per):
        conn.execute("BEGIN IMMEDIATE")
        statements.record_attempts(
            conn,
            [
                statements.Attempt(
                    rowid=rowid,
                    state="delivered",
                    next_attempt_at=now,
                    now=now,
                    status=200,
                    error=None,
                    response="ok",
                )
                for rowid in ids[start : start + per]
            ],
        )
        conn.execute("COMMIT")
    cpu = time.process_time() - before
    written = counts.io_counts()["wchar"] - before_io["wchar"]
    conn.close()
    return {"us": cpu / len(ids) * 1e6, "bytes": written / len(ids)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--payload", required=True)
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--conversations", type=int, default=2_000)
    parser.add_argument("--per", type=int, default=256, help="outcomes per commit")
    parser.add_argument("--wave", type=int, default=256, help="conversations a drain runs at once")
    parser.add_argument("--run", type=int, default=8, help="deliveries of a run (keyed-runs)")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    payload = Path(args.payload).read_bytes()
    work = Path(tempfile.mkdtemp(prefix="waba-record-cost-"))
    try:
        unkeyed, keyed = work / "unkeyed.sqlite3", work / "keyed.sqlite3"
        store(unkeyed, payload, args.count, 1)
        store(keyed, payload, args.count, 1, args.conversations)

        def pending(conn: sqlite3.Connection) -> list[tuple[int, str | None]]:
            query = "SELECT id, order_key FROM deliveries WHERE state = 'pending' ORDER BY id"
            return conn.execute(query).fetchall()

        def by_id(conn: sqlite3.Connection) -> list[int]:
            return [rowid for rowid, _ in pending(conn)]

        def steps(conn: sqlite3.Connection) -> list[int]:
            return _steps(pending(conn), args.wave, 0)

        def runs(conn: sqlite3.Connection) -> list[int]:
            return _steps(pending(conn), args.per // args.run, args.run)

        def no_index(conn: sqlite3.Connection) -> list[int]:
            conn.execute("DROP INDEX IF EXISTS deliveries_place")
            return steps(conn)

        def every_place(conn: sqlite3.Connection) -> list[int]:
            # The places of every keyed delivery, pending or not, without the due time: a
            # record changes neither the state nor anything else this index holds.
            conn.execute("DROP INDEX IF EXISTS deliveries_place")
            conn.execute(
                "CREATE INDEX deliveries_places ON deliveries"
                " (target, order_key, COALESCE(position, id)) WHERE order_key IS NOT NULL"
            )
            conn.execute("VACUUM")
            return steps(conn)

        def integer_keys(conn: sqlite3.Connection) -> list[int]:
            # Each key's first 64 bits as an integer: the index's entries shrink by 24 bytes.
            rows = pending(conn)
            conn.execute("BEGIN")
            conn.executemany(
                "UPDATE deliveries SET order_key = ? WHERE id = ?",
                [(int(str(key)[:16], 16) - 2**63, rowid) for rowid, key in rows],
            )
            conn.execute("COMMIT")
            conn.execute("VACUUM")
            return steps(conn)

        variants = {
            "unkeyed": (unkeyed, by_id),
            "keyed-steps": (keyed, steps),
            "keyed-runs": (keyed, runs),
            "keyed-noindex": (keyed, no_index),
            "keyed-integer": (keyed, integer_keys),
            "keyed-everyplace": (keyed, every_place),
        }
        found: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        for number in range(args.rounds):
            names = list(variants) if number % 2 == 0 else list(variants)[::-1]
            for name in names:
                source, order = variants[name]
                copy = _copy(source, work / f"{name}-{number}")
                found[name].append(measure(copy, order, args.per))
                shutil.rmtree(copy.parent)
        print(f"{args.count} deliveries, {args.conversations} conversations, {args.per} per commit")
        for name, rows in found.items():
            us = [row["us"] for row in rows]
            written = statistics.median(row["bytes"] for row in rows)
            print(
                f"{name:16s} {statistics.median(us):6.1f} us CPU per outcome"
                f" [{min(us):.1f}..{max(us):.1f}], {written:,.0f} bytes written per outcome"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
