"""The PostgreSQL outbox's claim by key for an ordered target, as the server runs it: EXPLAIN
ANALYZE on a throw-away local server, over a backlog of long or short conversations.

    PYTHONPATH=<checkout>:tests/support python bench/pg_claim_plan.py [--count 10000]
        [--conversations 1000] [--ask 480] [--limit 253] [--run 8] [--in-flight 0] [--jit off]
        [--plan]

Stores ``--count`` notifications for target ``sink``, notification ``n`` in conversation
``n % --conversations`` (its key a digest, as the edge keys it), through the outbox of the
checkout (its schema version, its indexes), then runs the claim that asks about ``--ask``
conversations with room for ``--limit`` first deliveries and runs of ``--run``, with the
first ``--in-flight`` deliveries in flight (the ids a claim leaves out), once, in a
transaction rolled back. Prints the server's execution time and, when the server compiled the
statement, its JIT timing: ``--jit on`` runs it as a session with the server's default
(``jit = on``), ``--jit off`` as the outbox's own connections do. ``--plan``: the whole plan.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import time

from pgserver import running_server

from gateway.config import OutboxConfig
from gateway.outbox import Route, open_outbox
from gateway.outbox.postgres import claim

SIG = "sha256=" + "0" * 64


def _key(n: int, conversations: int) -> str:
    return hashlib.sha256(b"conversation %d" % (n % conversations)).hexdigest()[:32]


async def _fill(url: str, count: int, conversations: int) -> None:
    outbox = await open_outbox(OutboxConfig(url=url), dispatching=False)
    try:
        for start in range(0, count, 500):
            await asyncio.gather(
                *(
                    outbox.accept(
                        b'{"n":%d,"pad":"%s"}' % (n, b"x" * 1200),
                        SIG,
                        [Route("sink", None, _key(n, conversations))],
                        1000.0,
                    )
                    for n in range(start, min(count, start + 500))
                )
            )
    finally:
        await outbox.close()


def _by_key(keys: list[str], limit: int, run: int, in_flight: int) -> str:
    """CLAIM for target ``sink`` asking about ``keys``, as a literal statement."""
    quoted = ",".join(f"'{key}'" for key in keys)
    values = {
        "$1": "ARRAY['sink']::text[]",
        "$2": f"ARRAY[{limit}]::integer[]",
        "$3": f"ARRAY[{claim.NAMED_CONVERSATIONS}]::integer[]",
        "$4": f"ARRAY[{run - 1}]::integer[]",
        "$5": repr(time.time() + 10),
        "$6": "'plan'",
        "$7": f"ARRAY[{','.join(str(n) for n in range(1, in_flight + 1))}]::bigint[]",
        "$8": "60",
        "$9": f"ARRAY[{','.join('1' for _ in keys)}]::integer[]",
        "$10": f"ARRAY[{quoted}]::text[]",
    }
    statement = claim.CLAIM
    for mark in sorted(values, key=lambda mark: -int(mark[1:])):  # $10 before $1
        statement = statement.replace(mark, values[mark])
    return statement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--ask", type=int, default=480)
    parser.add_argument("--limit", type=int, default=253)
    parser.add_argument("--run", type=int, default=8)
    parser.add_argument("--in-flight", type=int, default=0)
    parser.add_argument("--jit", choices=("on", "off"), default="off")
    parser.add_argument("--plan", action="store_true")
    args = parser.parse_args()
    with running_server() as server:
        server.psql("CREATE DATABASE plan")
        asyncio.run(_fill(server.socket_url("plan"), args.count, args.conversations))
        server.psql("ANALYZE", "plan")
        keys = [_key(n, args.conversations) for n in range(min(args.ask, args.conversations))]
        plan = server.psql(
            f"SET jit = {args.jit}; BEGIN; EXPLAIN (ANALYZE)"
            f" {_by_key(keys, args.limit, args.run, args.in_flight)}; ROLLBACK;",
            "plan",
        )
    lines = plan.splitlines()
    shown = lines if args.plan else [line for line in lines if "Timing:" in line]
    print(
        f"{args.count} pending over {args.conversations} conversations, {len(keys)} asked,"
        f" room {args.limit}, runs of {args.run}, {args.in_flight} in flight, jit {args.jit}:"
    )
    for line in [*shown, *(line for line in lines if line.startswith("Execution Time"))]:
        print(" ", line.strip())


if __name__ == "__main__":
    main()
