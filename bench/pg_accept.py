"""The PostgreSQL outbox's ack path on its own: ``PostgresOutbox.accept`` (the group commit and
the ``waba_gateway.accept`` call it makes) by many concurrent requests, on a throw-away local
server, without HTTP or TLS in front.

    PYTHONPATH=.:tests/support python bench/pg_accept.py [--count 5000] [--concurrency 1,64]
        [--rounds 3]

Each round opens a new database, as a dispatching gateway does (its deliveries leased at
accept), and accepts ``--count`` different 1.5 kB notifications, each with one route, from
``--concurrency`` concurrent callers (one: a group per acknowledgement; many: groups as large
as the load makes them). Prints, per round: acknowledgements per second, latency p50 and p99,
the mean group size, this process's CPU microseconds per acknowledgement (the committer's and
asyncpg's Python work), the server's CPU microseconds per acknowledgement (its processes'
user and system time, read in /proc: the backends serving the pool, the WAL writer, the
checkpointer) and the WAL bytes it wrote per acknowledgement (every accept is durable:
synchronous_commit is on).

``--record``: each caller also records its delivery's outcome (delivered) once accepted, as the
dispatcher does after the target's answer, so the figures include the outcome's update and its
attempt row (and the server's index maintenance for them). ``--same-body``: every caller posts
one and the same body, as the shared harness does (its candidate's dedup window is a
microsecond, so each copy is a new notification): a group holds many copies of one digest.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path

from pgserver import PgServer, running_server

from gateway.config import OutboxConfig
from gateway.outbox import AttemptResult, Delivered, Route
from gateway.outbox.postgres.outbox import PostgresOutbox

SIG = "sha256=" + "0" * 64
_WAL = "SELECT pg_current_wal_lsn()"


def server_cpu_s(server: PgServer) -> float:
    """User and system seconds of the postmaster and every process it started that still runs."""
    postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # ended meanwhile
        pid = int(stat.parent.name)
        if pid == postmaster or int(fields[1]) == postmaster:
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def load_average() -> str:
    """The machine's load averages, as each run ends with them (a shared machine's noise)."""
    return f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"


def _body(round_: int, i: int) -> bytes:
    return b'{"object":"whatsapp_business_account","r":%d,"n":%d,"pad":"%s"}' % (
        round_,
        i,
        b"x" * 1500,
    )


async def _round(
    server: PgServer, round_: int, count: int, concurrency: int, alter: str = "",
    record: bool = False,
    same_body: bool = False,
) -> str:
    database = f"accept_{round_}_{concurrency}{'_altered' if alter else ''}"
    server.psql(f"CREATE DATABASE {database}")
    groups: list[int] = []
    window = {"dedup_window_s": 0.000001} if same_body else {}
    outbox = await PostgresOutbox.open(
        OutboxConfig(url=server.socket_url(database), **window), on_commit=groups.append
    )
    if alter:
        server.psql(alter, database)
    routes = [Route("t", None)]
    bodies = [_body(round_, 0 if same_body else i) for i in range(count)]
    latencies: list[float] = []
    queue = iter(bodies)
    ok = AttemptResult(status=200)

    async def client() -> None:
        for body in queue:
            start = time.perf_counter()
            found = await outbox.accept(body, SIG, routes, time.time())
            latencies.append(time.perf_counter() - start)
            assert found is not None
            if record:
                await outbox.record_many([(found[0].id, Delivered(), ok)], time.time())

    try:
        wal_before = server.psql(_WAL, database)
        server_cpu = server_cpu_s(server)
        cpu, start = time.process_time(), time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        took, cpu = time.perf_counter() - start, time.process_time() - cpu
        server_cpu = server_cpu_s(server) - server_cpu
        wal = int(
            server.psql(f"SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '{wal_before}')", database)
        )
    finally:
        await outbox.close()
    cuts = statistics.quantiles(latencies, n=100)
    return (
        f"round {round_} concurrency {concurrency:3d}{' altered' if alter else ''}"
        f"{' recorded' if record else ''}{' same body' if same_body else ''}:"
        f" {count / took:7.0f} acks/s"
        f"  p50 {cuts[49] * 1000:6.2f} ms  p99 {cuts[98] * 1000:6.2f} ms"
        f"  group {count / len(groups):5.1f}  cpu {cpu / count * 1e6:5.0f} us/ack"
        f"  server cpu {server_cpu / count * 1e6:5.0f} us/ack"
        f"  wal {wal / count:5.0f} B/ack"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--concurrency", default="1,64", help="comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--alter",
        default="",
        help="SQL run on a second new database after the schema is made, measured in turn"
        " with the unaltered one (a schema change's cost)",
    )
    parser.add_argument(
        "--record", action="store_true", help="also record each delivery's outcome"
    )
    parser.add_argument("--same-body", action="store_true", help="one body, posted over again")
    options = parser.parse_args()
    levels = [int(level) for level in options.concurrency.split(",")]
    with running_server() as server:
        for round_ in range(1, options.rounds + 1):
            for level in levels:  # interleaved: each round measures every level in turn
                for alter in ("", options.alter) if options.alter else ("",):
                    line = await _round(
                        server, round_, options.count, level, alter, options.record,
                        options.same_body,
                    )
                    print(line, flush=True)
        print(load_average())


if __name__ == "__main__":
    os.environ.setdefault("PGCONNECT_TIMEOUT", "5")
    asyncio.run(main())
