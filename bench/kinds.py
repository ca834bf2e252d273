#!/usr/bin/env python3
"""Target kinds side by side: acks and deliveries with an HTTP, a Redis and a NATS target.

Each round runs, in an order that rotates from round to round, the shared harness's plain
receiver (``ref_gateway.py``, forwarding to the shared sink) and the gateway with each kind of
target: the HTTP sink, a Redis stream (``redis-server``), a NATS JetStream stream
(``nats-server -js``). For the gateway it measures keep-alive acks (``ab -k`` for ``--duration``
seconds) and then delivered per second: ``--e2e-count`` notifications acknowledged *and*
delivered (the outbox drained), over the time from the first request to the last delivery. The
gateway on ``--gw-cpus``; ab, the sink and the brokers on ``--load-cpus``. Over that e2e phase it
also reports the target's own CPU per delivery (the sink, ``redis-server`` or ``nats-server``:
it shares the load's CPUs with ab) and how busy the load's CPUs were: a target that costs more
there, or load CPUs at 100 %, slow ab down, and a gateway sent fewer requests at once does more
work per request.

    python bench/kinds.py --sink "$SHARED/sink.py" --payload "$SHARED/payload.json" --rounds 3

``--kinds redis,http`` runs only those kinds (with the plain receiver in every round).

Prints one JSON line per measurement on stderr and a table of medians [min..max] on stdout.
Every process it starts is stopped by its process id at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import (
    Bench,
    Proc,
    cpu_ticks,
    free_port,
    interrupt,
    log,
    pinned,
    run_ab,
    wait_drained,
    wait_listening,
    warm_up,
)

KINDS = ("http", "redis", "nats")


def start_brokers(bench: Bench, cpus: str | None) -> tuple[str, str, int, int]:
    """redis-server and nats-server -js on loopback, nothing saved for Redis, JetStream on disk
    (as a deployment's would be); their URLs and process ids."""
    redis_port, nats_port = free_port(), free_port()
    redis = [shutil.which("redis-server") or "redis-server", "--port", str(redis_port),
             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(bench.tmp)]
    nats = [shutil.which("nats-server", path="/usr/sbin:/usr/bin") or "nats-server", "-js",
            "-sd", str(bench.tmp / "jetstream"), "-a", "127.0.0.1", "-p", str(nats_port)]
    pids = []
    for name, argv, port in (("redis", redis, redis_port), ("nats", nats, nats_port)):
        proc = Proc(name, pinned(argv, cpus), bench.tmp, dict(os.environ))
        bench.procs.append(proc)
        wait_listening(port, proc, 10)
        pids.append(proc.pid)
    return (f"redis://127.0.0.1:{redis_port}/0", f"nats://127.0.0.1:{nats_port}", *pids)


def make_stream(nats_url: str) -> None:
    """The JetStream stream the NATS target publishes to, capped so a long run stays small."""
    import asyncio

    import nats

    async def make() -> None:
        client = await nats.connect(nats_url)
        try:
            await client.jetstream().add_stream(name="BENCH", subjects=["bench.>"],
                                                max_msgs=200_000)
        finally:
            await client.close()

    asyncio.run(make())


def target(kind: str, sink_port: int, redis_url: str, nats_url: str) -> tuple[str, str]:
    """(url, extra TOML) of the one target of a gateway with this kind."""
    if kind == "redis":
        return redis_url, 'kind = "redis"\nstream = "bench"\nmaxlen = 200000'
    if kind == "nats":
        return nats_url, 'kind = "nats"\nsubject = "bench.notifications"'
    return f"http://127.0.0.1:{sink_port}/sink", ""


def busy_ticks(cpus: str) -> tuple[int, int]:
    """(busy, total) clock ticks so far of the CPUs ``cpus`` names ("1", "0,1"), from
    /proc/stat: what share of the load's CPUs was in use, whoever used it."""
    wanted = {f"cpu{n}" for n in cpus.split(",")}
    busy = total = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name in wanted:
            ticks = [int(v) for v in values[:8]]
            total += sum(ticks)
            busy += sum(ticks) - ticks[3] - ticks[4]  # less idle and iowait
    return busy, total


def gateway_round(bench: Bench, kind: str, number: int, urls: tuple[str, str],
                  sink_port: int, target_pid: int) -> dict[str, Any]:
    a = bench.args
    url, toml = target(kind, sink_port, *urls)
    gateway = bench.gateway(f"gw-{kind}-{number}", target_port=sink_port, cpus=a.gw_cpus,
                            target_url=url, target_toml=toml)
    try:
        warm_up(bench, gateway, a.load_cpus)
        wait_drained(gateway, 60)
        ticks = cpu_ticks(gateway.proc.pid)
        acks = run_ab(bench, gateway.url, keepalive=True, duration_s=a.duration,
                      cpus=a.load_cpus)
        ack_ticks = cpu_ticks(gateway.proc.pid) - ticks
        wait_drained(gateway, 120)
        before = gateway.outbox_stats()["states"].get("delivered", 0)
        target_ticks, load = cpu_ticks(target_pid), busy_ticks(a.load_cpus)
        started, ticks = time.monotonic(), cpu_ticks(gateway.proc.pid)
        e2e = run_ab(bench, gateway.url, keepalive=True, count=a.e2e_count, cpus=a.load_cpus)
        drained = wait_drained(gateway, 120)
        total, e2e_ticks = time.monotonic() - started, cpu_ticks(gateway.proc.pid) - ticks
        target_ticks = cpu_ticks(target_pid) - target_ticks
        load_busy, load_total = (
            now - then for now, then in zip(busy_ticks(a.load_cpus), load, strict=True))
        states = gateway.outbox_stats()["states"]
        delivered = states.get("delivered", 0) - before
        return {"kind": kind, "round": number, "ack_rps": acks["rps"], "ack_p50_ms": acks["p50_ms"],
                "ack_p99_ms": acks["p99_ms"], "ack_errors": acks["errors"],
                # The gateway's CPU (user + system, all its threads) per request answered while
                # it also delivered, and per notification acknowledged *and* delivered.
                "ack_cpu_us": _per(ack_ticks, acks["complete"]),
                "e2e_cpu_us": _per(e2e_ticks, delivered),
                # What the target (the sink, redis-server, nats-server) cost per delivery on
                # the load's CPUs, which ab shares, and how busy those CPUs were meanwhile.
                "target_cpu_us": _per(target_ticks, delivered),
                "load_cpu_busy": round(load_busy / load_total, 3) if load_total else None,
                "e2e_errors": e2e["errors"],
                "delivered": delivered, "drained": drained is not None,
                "dead": states.get("dead", 0),
                "delivered_per_s": round(delivered / total, 1) if drained is not None else None}
    finally:
        bench.stop_gateway(gateway)


def _per(ticks: int, count: float) -> float | None:
    """Microseconds of CPU per item, from clock ticks (USER_HZ) over ``count`` items."""
    if count <= 0:
        return None
    return round(ticks / os.sysconf("SC_CLK_TCK") / count * 1e6, 1)


def receiver_round(bench: Bench, number: int, sink_port: int) -> dict[str, Any]:
    """The shared harness's plain receiver (ref_gateway.py), keep-alive acks."""
    a = bench.args
    port = free_port()
    env = dict(bench.env_base, BENCH_LISTEN_PORT=str(port),
               BENCH_TARGET_URL=f"http://127.0.0.1:{sink_port}/sink")
    script = Path(a.sink).resolve().parent / "ref_gateway.py"
    proc = Proc(f"ref-1p-{number}", pinned([sys.executable, str(script)], a.gw_cpus), bench.tmp,
                env)
    try:
        wait_listening(port, proc, 15)
        url = f"https://127.0.0.1:{port}{bench.path}"
        run_ab(bench, url, keepalive=True, duration_s=1, cpus=a.load_cpus)
        ticks = cpu_ticks(proc.pid)
        acks = run_ab(bench, url, keepalive=True, duration_s=a.duration, cpus=a.load_cpus)
        ack_ticks = cpu_ticks(proc.pid) - ticks
        return {"kind": "ref-1p", "round": number, "ack_rps": acks["rps"],
                "ack_p50_ms": acks["p50_ms"], "ack_p99_ms": acks["p99_ms"],
                "ack_errors": acks["errors"],
                "ack_cpu_us": _per(ack_ticks, acks["complete"])}
    finally:
        proc.stop()


def table(rows: list[dict[str, Any]]) -> str:
    def spread(values: list[float]) -> str:
        if not values:
            return "-"
        return f"{statistics.median(values):,.0f} [{min(values):,.0f}..{max(values):,.0f}]"

    lines = ["| run | acks/s (keep-alive) | ack p50 / p99 ms | CPU us per ack | delivered/s |"
             " CPU us per notification acked and delivered | target's CPU us per delivery |"
             " load CPU busy |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for kind in ("ref-1p", *KINDS):
        mine = [row for row in rows if row["kind"] == kind]
        if not mine:
            continue
        p50 = statistics.median(row["ack_p50_ms"] or 0 for row in mine)
        p99 = statistics.median(row["ack_p99_ms"] or 0 for row in mine)
        delivered = [row["delivered_per_s"] for row in mine if row.get("delivered_per_s")]
        ack_cpu = [row["ack_cpu_us"] for row in mine if row.get("ack_cpu_us")]
        e2e_cpu = [row["e2e_cpu_us"] for row in mine if row.get("e2e_cpu_us")]
        target_cpu = [row["target_cpu_us"] for row in mine if row.get("target_cpu_us")]
        busy = [row["load_cpu_busy"] * 100 for row in mine if row.get("load_cpu_busy")]
        name = "plain receiver (ref-1p)" if kind == "ref-1p" else f"waba-gateway, {kind} target"
        lines.append(f"| {name} | {spread([row['ack_rps'] for row in mine])} | {p50:.2f} / "
                     f"{p99:.1f} | {spread(ack_cpu)} | "
                     f"{spread(delivered) if kind != 'ref-1p' else 'n/a'} | "
                     f"{spread(e2e_cpu) if kind != 'ref-1p' else 'n/a'} | "
                     f"{spread(target_cpu) if kind != 'ref-1p' else 'n/a'} | "
                     f"{spread(busy) + ' %' if kind != 'ref-1p' else 'n/a'} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sink", default=os.environ.get("WABA_BENCH_SINK"), required=False,
                        help="the shared harness's sink.py (ref_gateway.py beside it)")
    parser.add_argument("--payload", help="notification body (default: a built-in message)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=8, help="seconds of keep-alive acks")
    parser.add_argument("--e2e-count", type=int, default=10_000)
    parser.add_argument("-c", "--concurrency", type=int, default=32)
    parser.add_argument("--gw-cpus", default="0")
    parser.add_argument("--load-cpus", default="1")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help="the target kinds to run, comma-separated (the plain receiver"
                             " runs in every round whichever are chosen)")
    parser.add_argument("--json", help="write all results here")
    args = parser.parse_args(argv)
    args.kinds = [kind for kind in args.kinds.split(",") if kind]
    if not args.kinds or set(args.kinds) - set(KINDS):
        parser.error(f"--kinds: expected some of {', '.join(KINDS)}")
    if not args.sink:
        parser.error("--sink (or $WABA_BENCH_SINK) is required")
    # What Bench reads and these phases do not set.
    args.outbox, args.label = "sqlite", "kinds"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="waba-kinds-"))
    bench = Bench(args, tmp)
    signal.signal(signal.SIGTERM, interrupt)
    rows: list[dict[str, Any]] = []
    try:
        sink_port = free_port()
        sink = bench.sink(sink_port, args.load_cpus)
        redis_url, nats_url, redis_pid, nats_pid = start_brokers(bench, args.load_cpus)
        urls = (redis_url, nats_url)
        target_pids = {"http": sink.pid, "redis": redis_pid, "nats": nats_pid}
        make_stream(nats_url)
        order = ["ref-1p", *(kind for kind in KINDS if kind in args.kinds)]
        for number in range(1, args.rounds + 1):
            for kind in order:
                if kind == "ref-1p":
                    row = receiver_round(bench, number, sink_port)
                else:
                    row = gateway_round(bench, kind, number, urls, sink_port,
                                        target_pids[kind])
                log(json.dumps(row))
                rows.append(row)
            order = order[1:] + order[:1]  # interleaved: each goes first in some round
    except KeyboardInterrupt:
        log("interrupted")
    finally:
        bench.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": bench.results["meta"], "rows": rows},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
