#!/usr/bin/env python3
"""CPU per delivery of each target kind's sender, without the gateway around it.

Sends ``--count`` deliveries of the payload through each sender (HTTP to the shared sink, Redis
XADD to ``redis-server``, NATS JetStream publish to ``nats-server -js``), in batches of
``--batch`` (32) with ``--in-flight`` (8) batches out at once, as the dispatcher does, and
prints per kind and round: deliveries per second (wall) and microseconds of this process's CPU
per delivery. Rounds alternate the kinds. ``--batch 1 --in-flight 1`` is the gateway's usual
case under a steady load: each batch then pays for its own writes, reads and wake-ups.

    PYTHONPATH=.:tests/support python bench/senders.py --sink "$SHARED/sink.py" \\
        --payload "$SHARED/payload.json" --rounds 3

``--kinds redis`` measures one kind alone: under ``valgrind --tool=callgrind`` the difference of
the instructions counted at two ``--count`` values is the instructions per delivery, whatever
else the machine is doing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests" / "support")]

from brokers import nats_server, pending_delivery, redis_server  # noqa: E402
from sinkproc import running_sink  # noqa: E402

from gateway.config import TargetConfig  # noqa: E402
from gateway.delivery.sending import sender_for  # noqa: E402


async def measure(target: TargetConfig, body: bytes, count: int, first: int,
                  size: int = 32, in_flight: int = 8) -> str:
    sender = sender_for(target)
    await sender.warm()
    room = asyncio.Semaphore(in_flight)

    async def batch(start: int) -> None:
        async with room:
            numbers = range(first + start, first + start + size)
            batch = [pending_delivery(n, body, prefix="bench") for n in numbers]
            results = await sender.send_many(batch, [1] * size)
            bad = [r for r in results if not (r.accepted or r.status == 200)]
            assert not bad, bad[0]

    cpu, wall = time.process_time(), time.monotonic()
    await asyncio.gather(*(batch(start) for start in range(0, count, size)))
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    await sender.close()
    return f"{target.kind:>5}: {count / wall:>9,.0f} deliveries/s  {cpu / count * 1e6:5.1f} us CPU each"


async def run(args: argparse.Namespace, http_port: int) -> None:
    import nats

    body = Path(args.payload).read_bytes()
    with redis_server() as redis, nats_server() as nats_broker:
        client = await nats.connect(nats_broker.url)
        await client.jetstream().add_stream(name="BENCH", subjects=["bench.>"])
        await client.close()
        targets = [
            TargetConfig(name="t", url=f"http://127.0.0.1:{http_port}/sink"),
            TargetConfig(name="t", kind="redis", url=redis.url, stream="s", maxlen=100_000),
            TargetConfig(name="t", kind="nats", url=nats_broker.url, subject="bench.x"),
        ]
        targets = [target for target in targets if target.kind in args.kinds]
        for number in range(args.rounds):
            turn = number % len(targets)
            for target in targets[turn:] + targets[:turn]:
                line = await measure(target, body, args.count, number * args.count, args.batch,
                                     args.in_flight)
                print(f"round {number + 1} {line}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sink", required=True, help="the shared harness's sink.py")
    parser.add_argument("--payload", required=True)
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32,
                        help="deliveries per batch (the gateway's come in batches of 1 to"
                             " pipeline = 32, as many as came due in one turn of its loop)")
    parser.add_argument("--in-flight", type=int, default=8,
                        help="batches out at once (the gateway under load mostly has 1: each"
                             " batch then pays for its own reads, writes and wake-ups)")
    parser.add_argument("--kinds", default="http,redis,nats",
                        help="the kinds to measure, comma-separated")
    args = parser.parse_args()
    args.kinds = args.kinds.split(",")
    with running_sink(args.sink) as port:
        asyncio.run(run(args, port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
