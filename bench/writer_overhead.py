"""The SQLite outbox's writer alone: CPU per stored notification, writes alternating with reads.

Rule: no network, no TLS, no HTTP; only what the outbox's writer thread and the event loop
spend to store notifications in group commits (``-c`` at a time, as concurrent requests do) with
a dispatcher-like read (``due``) after each group, so that the writer switches between write and
read transactions as it does under load. It prints the process CPU time (every thread) per
notification and the wall time, for each round; run it for two revisions in alternation and
compare, since the machine's other load moves wall time far more than CPU time.

  python bench/writer_overhead.py --count 20000 -c 16 --rounds 3
  PYTHONPATH=/path/to/other/checkout python bench/writer_overhead.py ...   # the other revision
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from gateway.outbox.model import Route
from gateway.outbox.sqlite.outbox import SqliteOutbox

SIGNATURE = "sha256=" + "0" * 64


async def _round(folder: Path, count: int, concurrency: int) -> tuple[float, float]:
    outbox = SqliteOutbox(folder / "outbox.sqlite3", dedup_window_s=1e-6)
    routes = [Route("sink", None)]
    try:
        started_cpu, started = time.process_time(), time.monotonic()
        for first in range(0, count, concurrency):
            now = time.time()
            await asyncio.gather(
                *(
                    outbox.accept(b'{"n":%d}' % n, SIGNATURE, routes, now)
                    for n in range(first, min(first + concurrency, count))
                )
            )
            await outbox.due(now, {"sink": 1})
        return time.process_time() - started_cpu, time.monotonic() - started
    finally:
        await outbox.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20000, help="notifications per round")
    parser.add_argument("-c", "--concurrency", type=int, default=16, help="per group commit")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    per_notification = []
    for number in range(1, args.rounds + 1):
        with tempfile.TemporaryDirectory() as folder:
            cpu, wall = asyncio.run(_round(Path(folder), args.count, args.concurrency))
        per_notification.append(cpu / args.count * 1e6)
        print(
            f"round {number}: {per_notification[-1]:.1f} us CPU per notification,"
            f" {args.count / wall:,.0f} notifications/s wall"
        )
    print(
        f"median {statistics.median(per_notification):.1f} us CPU per notification"
        f" (min {min(per_notification):.1f}, max {max(per_notification):.1f})"
    )


if __name__ == "__main__":
    main()
