"""The PostgreSQL outbox's claims across several targets: a dispatcher's drain loop, on a
throw-away local server, without HTTP.

    PYTHONPATH=<checkout>:tests/support python bench/pg_claim.py [--count 2000] [--targets 4]
        [--ordered] [--runs 4] [--rounds 3]

Each round stores ``--count`` notifications, each routed to every one of ``--targets``
targets (1.5 kB bodies; with ``--ordered`` keyed over ``count / 10`` conversations and claimed
as ordered targets, in runs of ``--runs``), then claims up to 64 per target at a time and
records each claimed batch delivered, until nothing is due. Prints per round: claims made,
milliseconds per claim (wall, round trips included), this process's CPU and the server's CPU
per delivery. Run it from two checkouts in turn to compare revisions (each its own line).
"""

from __future__ import annotations

import argparse
import asyncio
import time

from pg_accept import load_average, server_cpu_s
from pgserver import PgServer, running_server

from gateway.config import OutboxConfig
from gateway.outbox import AttemptResult, Delivered, Route
from gateway.outbox.postgres.outbox import PostgresOutbox

SIG = "sha256=" + "0" * 64


async def _round(url: str, server: PgServer, args: argparse.Namespace, round_: int) -> str:
    targets = [f"t{n}" for n in range(args.targets)]
    writer = await PostgresOutbox.open(OutboxConfig(url=url), dispatching=False)
    pad = b"x" * 1500
    conversations = max(1, args.count // 10)
    accepts = []
    for n in range(args.count):
        key = f"k{n % conversations}" if args.ordered else None
        routes = [Route(target, None, key) for target in targets]
        body = b'{"r":%d,"n":%d,"pad":"%s"}' % (round_, n, pad)
        accepts.append(writer.accept(body, SIG, routes, 1000.0 + n * 1e-3))
    for start in range(0, len(accepts), 64):
        await asyncio.gather(*accepts[start : start + 64])
    await writer.close()
    box = await PostgresOutbox.open(OutboxConfig(url=url))
    ordered = set(targets) if args.ordered else set()
    runs = dict.fromkeys(targets, args.runs) if args.ordered else None
    claims = delivered = 0
    ok = AttemptResult(status=200)
    server_cpu = server_cpu_s(server)
    cpu, wall, claim_s = time.process_time(), time.perf_counter(), 0.0
    while True:
        started = time.perf_counter()
        due = await box.due(1e9, dict.fromkeys(targets, 64), ordered=ordered, runs=runs)
        claim_s += time.perf_counter() - started
        claims += 1
        if not due:
            break
        await box.record_many([(d.id, Delivered(), ok) for d in due], 2000.0)
        delivered += len(due)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    server_cpu = server_cpu_s(server) - server_cpu
    await box.close()
    assert delivered == args.count * args.targets, delivered
    return (
        f"round {round_}: {claims} claims, {claim_s / claims * 1000:6.2f} ms/claim,"
        f" {delivered / wall:6.0f} deliveries/s, cpu {cpu / delivered * 1e6:5.0f} us/delivery,"
        f" server cpu {server_cpu / delivered * 1e6:5.0f} us/delivery"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--targets", type=int, default=4)
    parser.add_argument("--ordered", action="store_true")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with running_server() as server:
        for round_ in range(1, args.rounds + 1):
            server.psql(f"CREATE DATABASE claim_{round_}")
            print(await _round(server.socket_url(f"claim_{round_}"), server, args, round_))
        print(load_average())


if __name__ == "__main__":
    asyncio.run(main())
