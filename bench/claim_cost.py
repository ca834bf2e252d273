#!/usr/bin/env python3
"""The SQLite outbox's claim and record alone, in one process, no network: CPU per delivery.

Rule: ``--count`` deliveries of one target are stored (bodies of 1.5 kB), then claimed 256 at a
time and each batch recorded delivered, until none is due; the process CPU time of that loop
over the deliveries. ``--ordered`` keys them over ``count / 10`` conversations and claims them
as an ordered target does (first deliveries only). Run it from two checkouts in turn
(``PYTHONPATH=<checkout>``) to compare revisions: it prints one line per run.

Usage: PYTHONPATH=. python bench/claim_cost.py [--count 5000] [--ordered]
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import shutil
import tempfile
import time
from pathlib import Path

from gateway.outbox import AttemptResult, Delivered, Route
from gateway.outbox.sqlite.outbox import SqliteOutbox


async def measure(count: int, ordered: bool) -> float:
    folder = Path(tempfile.mkdtemp(prefix="waba-claim-cost-"))
    try:
        box = SqliteOutbox(folder / "outbox.sqlite3", dedup_window_s=0.000001)
        pad = b"x" * 1500
        for n in range(count):
            key = f"k{n % max(1, count // 10)}" if ordered else None
            body = b'{"n":%d,"pad":"%s"}' % (n, pad)
            await box.accept(body, "sha256=x", [Route("t", None, key)], 1.0 + n * 1e-6)
        # As the dispatcher records, where the revision takes it: each delivery's created_at
        # as handed out (a replay since then stands over the outcome).
        created = "created" in inspect.signature(box.record_many).parameters
        started, done = time.process_time(), 0
        while due := await box.due(1e9, {"t": 256}, ordered={"t"} if ordered else ()):
            outcomes = [(d.id, Delivered(), AttemptResult(status=200)) for d in due]
            if created:
                await box.record_many(outcomes, 2.0, {d.id: d.created_at for d in due})
            else:
                await box.record_many(outcomes, 2.0)
            done += len(due)
        cpu = time.process_time() - started
        await box.close()
        return 1e6 * cpu / max(done, 1)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--ordered", action="store_true")
    args = parser.parse_args()
    us = asyncio.run(measure(args.count, args.ordered))
    mode = "ordered" if args.ordered else "none"
    print(f"{mode}: {us:.1f} us CPU per delivery (claim and record, {args.count} deliveries)")


if __name__ == "__main__":
    main()
