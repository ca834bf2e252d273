#!/usr/bin/env python3
"""The dispatcher alone draining a stored backlog: deliveries per second and CPU per delivery,
for two revisions interleaved.

Each run stores ``--count`` notifications (one delivery each per target) in a fresh SQLite
outbox with no dispatcher, then starts a ``Dispatcher`` towards the shared harness's sink and
times it until nothing is pending. A run is a fresh interpreter whose ``gateway`` package comes
from the folder given with ``--tree`` (a ``git archive`` of a revision, or this checkout), so
both revisions run this same script. Its figures: delivered/s (wall) and microseconds of the
process's CPU per delivery (the event loop and the outbox's writer thread: claims, sends and
records; the storing is not counted). Rounds alternate the trees' order (A B, B A, ...), and in
every round the HTTP sender alone sends as many deliveries in the same batches with no outbox and
no dispatcher: the plain forwarder, whose figure moves only with the machine's load. The summary
gives, per tree, the median and [min..max], and B over A per round.

    python bench/drain.py --sink "$SHARED/sink.py" --payload "$SHARED/payload.json" \\
        --tree /tmp/base --tree . --rounds 5 --count 20000

``--callgrind`` counts instructions instead (valgrind's callgrind, whatever the machine's load):
in each round each tree drains ``--count`` and twice ``--count`` under it, and the difference
over ``--count`` is the instructions per delivery, without the interpreter's start and the
imports. (How many claims and batches a drain takes still depends on timing, so the counts vary
a little from run to run: take several rounds.) With ``--by-library`` each round also splits
them by where they were counted (``callgrind_annotate``, per function, grouped by library).
"""

# ruff: noqa: S603
# S603/S607: this script runs itself, the sink and valgrind as subprocesses, with argument lists
# built here (never a shell string).

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sinkproc import running_sink

HERE = Path(__file__).resolve().parent


def copy_outbox(source: Path, target: Path) -> None:
    """Copy a SQLite outbox file with its write-ahead log (``-wal``), where it has one."""
    for suffix in ("", "-wal"):
        if Path(f"{source}{suffix}").exists():
            shutil.copy(f"{source}{suffix}", f"{target}{suffix}")


def store(
    outbox_path: Path, payload: bytes, count: int, targets: int, conversations: int = 0
) -> None:
    """``count`` distinct notifications, each routed to every target, committed; with
    ``conversations``, notification ``n`` belongs to conversation ``n % conversations`` (its
    key a digest, as the edge gives it for an ordered target: keys that sorted in the order
    they were stored would keep each step of the drain's runs in a few pages of the place
    index, which the gateway's own backlog never does)."""
    from gateway.config import OutboxConfig
    from gateway.outbox import Route, open_outbox

    def routes(n: int) -> list[Route]:
        key = None
        if conversations:
            key = hashlib.sha256(b"conversation %d" % (n % conversations)).hexdigest()[:32]
        return [Route(f"t{t}", None, key) for t in range(targets)]

    stem = payload.rstrip().removesuffix(b"}")

    async def fill() -> None:
        outbox = await open_outbox(OutboxConfig(path=outbox_path), dispatching=False)
        try:
            for start in range(0, count, 500):
                await asyncio.gather(
                    *(
                        outbox.accept(stem + b',"n":%d}' % n, "sha256=00", routes(n), 0.0)
                        for n in range(start, min(count, start + 500))
                    )
                )
        finally:
            await outbox.close()

    asyncio.run(fill())


def drain(
    outbox_path: Path,
    port: int,
    targets: int,
    order: str = "none",
    counting: bool = False,
    target_name: str | None = None,
    timing: bool = False,
) -> dict[str, Any]:
    """Start the dispatcher on the stored outbox; time it until nothing is pending. Also
    counted: the claims (calls of the outbox's ``due``) and the deliveries they handed out,
    and the batches sent: what a drain's rate is made of. ``counting``: everything
    ``counts.py`` counts too, over the drain alone (``counts`` in the result); ``timing``: the
    CPU of each SQL statement over the drain alone (``statements.py``)."""
    if counting:
        import counts

        counts.install()
    if timing:
        import statements

        statements.install()
    import gateway
    from gateway.config import DispatcherConfig, OutboxConfig, TargetConfig
    from gateway.delivery.dispatcher import Dispatcher
    from gateway.outbox import open_outbox

    class Counted:
        """Hears each recorded outcome: the drain is over when every delivery owed is in."""

        def __init__(self, owed: int) -> None:
            self.owed, self.done = owed, asyncio.Event()

        def attempted(self, target: str, outcome: str, latency_s: float | None) -> None:
            assert outcome == "delivered", outcome
            self.owed -= 1
            if not self.owed:
                self.done.set()

        def dead_letters_expired(self, count: int) -> None:
            pass

    async def run() -> dict[str, Any]:
        outbox = await open_outbox(OutboxConfig(path=outbox_path))
        owed = sum(b.pending for b in await outbox.backlog())
        counted = Counted(owed)
        claims = {"claims": 0, "claimed": 0}
        due = outbox.due

        async def counting_due(*args: Any, **kwargs: Any) -> Any:
            found = await due(*args, **kwargs)
            claims["claims"] += 1
            claims["claimed"] += len(found)
            return found

        outbox.due = counting_due  # type: ignore[method-assign]
        config = [
            TargetConfig(
                name=target_name or f"t{n}",
                url=f"http://127.0.0.1:{port}/t{n}",
                order=order,  # type: ignore[arg-type]
            )
            for n in range(targets)
        ]
        dispatcher = Dispatcher(
            outbox, config, DispatcherConfig(), retention_s=3600.0, observer=counted
        )
        if timing:
            statements.reset()  # the file's opening and first reads are not the drain's
        before = counts.snapshot() if counting else {}
        io = counts.io_counts() if counting else {}
        cpu, wall, main = time.process_time(), time.monotonic(), time.thread_time()
        dispatcher.start()
        await counted.done.wait()
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        main = time.thread_time() - main
        spent = statements.snapshot() if timing else None
        found = None
        if counting:
            found = counts.difference(before, counts.snapshot())
            found.update(counts.difference(io, counts.io_counts()))
        await dispatcher.stop()
        await outbox.close()
        return {
            **({"counts": found} if found is not None else {}),
            **({"statements": spent} if spent is not None else {}),
            "delivered": owed,
            "wall_s": wall,
            "cpu_s": cpu,
            # The event loop's thread alone; the rest is the outbox's writer thread's.
            "main_cpu_s": main,
            "gateway": gateway.__file__,
            **claims,
        }

    return asyncio.run(run())


def forward(port: int, payload: bytes, count: int) -> dict[str, Any]:
    """The plain forwarder: the HTTP sender alone, in batches of 32 with 32 in flight, as the
    dispatcher sends with a target's defaults."""
    from brokers import pending_delivery  # tests/support, on the child's path (spawn)

    from gateway.config import TargetConfig
    from gateway.delivery.sending import sender_for

    async def run() -> dict[str, Any]:
        sender = sender_for(TargetConfig(name="t0", url=f"http://127.0.0.1:{port}/t0"))
        await sender.warm()
        room = asyncio.Semaphore(1)  # concurrency 32 = one pipelined batch of 32 at a time

        async def batch(start: int) -> None:
            async with room:
                deliveries = [
                    pending_delivery(n, payload, prefix="d", target="t0")
                    for n in range(start, min(count, start + 32))
                ]
                await sender.send_many(deliveries, [1] * len(deliveries))

        cpu, wall = time.process_time(), time.monotonic()
        await asyncio.gather(*(batch(start) for start in range(0, count, 32)))
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        await sender.close()
        return {"delivered": count, "wall_s": wall, "cpu_s": cpu}

    return asyncio.run(run())


def child(args: argparse.Namespace) -> int:
    """One run, in this interpreter: the figures as one JSON line on stdout."""
    payload = Path(args.payload).read_bytes()
    if args.child == "forward":
        result = forward(args.port, payload, args.count * args.targets)
    elif args.child == "store":
        store(Path(args.outbox), payload, args.count, args.targets, args.conversations)
        result = {}
    else:
        result = drain(
            Path(args.outbox),
            args.port,
            args.targets,
            args.order,
            args.counts,
            "sink" if args.from_outbox else None,
            args.statements,
        )
    print(json.dumps(result), flush=True)
    return 0


def spawn(
    args: argparse.Namespace,
    tree: Path,
    what: str,
    port: int,
    workdir: Path,
    count: int,
    callgrind: bool = False,
    order: str = "none",
    conversations: int | None = None,
) -> dict[str, Any]:
    outbox = Path(tempfile.mkdtemp(dir=workdir)) / "outbox.sqlite3"
    # The tree's gateway package, and this checkout's test helpers (brokers.pending_delivery).
    support = Path(__file__).resolve().parent.parent / "tests" / "support"
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(tree.resolve()), str(support)])}

    def command(what: str) -> list[str]:
        return [
            sys.executable,
            __file__,
            "--child",
            what,
            "--port",
            str(port),
            "--outbox",
            str(outbox),
            "--payload",
            args.payload,
            "--count",
            str(count),
            "--targets",
            str(args.targets),
            "--order",
            order,
            "--conversations",
            str((conversations or args.conversations) if order == "conversation" else 0),
            *(["--counts"] if args.counts else []),
            *(["--statements"] if args.statements else []),
            *(["--from-outbox", args.from_outbox] if args.from_outbox else []),
        ]

    if what == "drain" and args.from_outbox:  # a copy: each run drains the same backlog
        copy_outbox(Path(args.from_outbox), outbox)
    elif what == "drain":  # stored beforehand, in a process of its own: not measured
        subprocess.run(
            command("store"), env=env, check=True, timeout=600, stdout=subprocess.DEVNULL
        )
    argv = command(what)
    if callgrind:
        out = outbox.with_name("callgrind.out")
        argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv]
    else:
        if what == "drain" and args.py_spy:
            profile = Path(args.py_spy) / f"{tree.resolve().name}-{order}-{int(time.time())}.txt"
            profile.parent.mkdir(parents=True, exist_ok=True)
            argv = [
                "py-spy",
                "record",
                "--rate",
                "250",
                "--format",
                "raw",
                "--threads",
                *(["--native"] if args.py_spy_native else ["--nonblocking"]),
                "--output",
                str(profile),
                "--",
                *argv,
            ]
        if args.gw_cpus:
            argv = ["taskset", "-c", args.gw_cpus, *argv]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=3600, check=False)
    if done.returncode:
        raise SystemExit(f"{what} in {tree} failed:\n{done.stderr[-3000:]}")
    # The child's result is its last JSON line; py-spy, when it runs the child, prints its own
    # lines after it.
    last = next(line for line in reversed(done.stdout.splitlines()) if line.startswith("{"))
    result: dict[str, Any] = json.loads(last)
    if callgrind:
        summary = re.search(r"^summary:\s+(\d+)", out.read_text(), re.MULTILINE)
        assert summary is not None, "no summary in callgrind's output"
        result["instructions"] = int(summary.group(1))
        if args.by_library:
            result["groups"] = library_groups(out)
    shutil.rmtree(outbox.parent)
    return result


# Where an instruction was counted, by the file callgrind_annotate names for its function:
# the first group whose marks one of them is in.
_GROUPS = (
    ("SQLite", ("libsqlite3",)),
    ("OpenSSL (the bodies' digests)", ("libcrypto",)),
    ("locks and the GIL", ("pthread_", "ceval_gil", "PyEval_SaveThread", "PyEval_RestoreThread")),
    ("allocation and collection", ("obmalloc", "malloc", "dealloc", "gcmodule", "traverse")),
    ("the interpreter loop", ("ceval.c",)),
)
_ELSE = "everything else"


def library_groups(out: Path) -> dict[str, int]:
    """The instructions of a callgrind output per group of :data:`_GROUPS`."""
    text = subprocess.run(
        ["callgrind_annotate", "--threshold=100", str(out)],  # noqa: S607 (valgrind's tool)
        capture_output=True, text=True, check=True, timeout=600,
    ).stdout
    groups = dict.fromkeys([*(name for name, _ in _GROUPS), _ELSE], 0)
    for line in text.splitlines():
        found = re.match(r"\s*([\d,]+)\s+\([^)]*\)\s+(\S.*)$", line)
        if found is None or "PROGRAM TOTALS" in found.group(2):
            continue
        where = found.group(2)
        name = next((n for n, marks in _GROUPS if any(m in where for m in marks)), _ELSE)
        groups[name] += int(found.group(1).replace(",", ""))
    return groups


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):,.3f} [{min(values):,.3f}..{max(values):,.3f}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sink", help="the shared harness's sink.py")
    parser.add_argument("--payload", required=True)
    parser.add_argument(
        "--tree",
        action="append",
        type=Path,
        default=[],
        help="a folder holding a gateway package (twice: A, then B)",
    )
    parser.add_argument("--count", type=int, default=20_000, help="notifications per run")
    parser.add_argument("--targets", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gw-cpus", default="0", help="taskset CPUs of the runs ('' for none)")
    parser.add_argument("--load-cpus", default="1", help="taskset CPUs of the sink")
    parser.add_argument("--callgrind", action="store_true")
    parser.add_argument(
        "--by-library",
        action="store_true",
        help="with --callgrind: each round's instructions per delivery split by where they were"
        " counted (SQLite, OpenSSL, locks, allocation, the interpreter loop, the rest)",
    )
    parser.add_argument(
        "--order",
        default="none",
        help="the targets' order: none, conversation, or both (none,conversation), each run"
        " beside the other in every round",
    )
    parser.add_argument(
        "--conversations",
        type=int,
        default=1000,
        help="with order = conversation: notification n belongs to conversation n %% this",
    )
    parser.add_argument(
        "--counts",
        action="store_true",
        help="count claims, looks, commits, batches, loop turns, tasks and timers per delivery"
        " (counts.py) and print them beside each run",
    )
    parser.add_argument(
        "--statements",
        action="store_true",
        help="time each SQL statement of the outbox over the drain (statements.py) and print"
        " the costliest beside each run",
    )
    parser.add_argument(
        "--from-outbox",
        help="drain a copy of this stored outbox (bench/ordering.py --keep-outbox keeps them;"
        " its target is named sink) instead of storing --count notifications",
    )
    parser.add_argument("--py-spy", help="a folder: py-spy's raw profile of each drain there")
    parser.add_argument(
        "--py-spy-native", action="store_true", help="with --py-spy: native frames too"
    )
    parser.add_argument("--child", choices=("store", "drain", "forward"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--outbox", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if not args.sink or not 1 <= len(args.tree) <= 2:
        parser.error("--sink and one or two --tree are required")
    workdir = Path(tempfile.mkdtemp(prefix="drain-"))
    try:
        with running_sink(args.sink, args.load_cpus) as port:
            print(f"load average before: {os.getloadavg()[0]:.1f}", flush=True)
            if args.callgrind:
                callgrind(args, port, workdir)
            else:
                interleave(args, port, workdir)
            print(f"load average after: {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def variants(args: argparse.Namespace) -> list[tuple[str, Path, str]]:
    """Each run of a round: (label, tree, order), every tree with every order asked for."""
    orders = args.order.split(",")
    return [
        (str(tree) if len(orders) == 1 else f"{tree} {order}", tree, order)
        for tree in args.tree
        for order in orders
    ]


def interleave(args: argparse.Namespace, port: int, workdir: Path) -> None:
    trees = variants(args)
    rate: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    for number in range(args.rounds):
        order = trees if number % 2 == 0 else trees[::-1]
        runs = [(label, "drain", tree, mode) for label, tree, mode in order]
        runs.append(("plain", "forward", args.tree[0], "none"))
        for label, what, tree, mode in runs:
            result = spawn(args, tree, what, port, workdir, args.count, order=mode)
            per_s = result["delivered"] / result["wall_s"]
            us = result["cpu_s"] / result["delivered"] * 1e6
            rate.setdefault(label, []).append(per_s)
            cpu.setdefault(label, []).append(us)
            claims = ""
            if "main_cpu_s" in result:
                main_us = result["main_cpu_s"] / result["delivered"] * 1e6
                claims = f" (loop {main_us:.1f}, writer {us - main_us:.1f})"
            if result.get("claims"):
                claims += (
                    f", {result['claims'] / result['wall_s']:,.0f} claims/s,"
                    f" {result['claimed'] / result['claims']:.1f} handed out per claim"
                )
            print(
                f"round {number + 1} {label}: {per_s:,.0f} delivered/s, {us:.1f} us CPU "
                f"per delivery{claims} ({result.get('gateway', 'sender alone')})",
                flush=True,
            )
            if result.get("counts"):
                from counts import per_delivery

                table = per_delivery(result["counts"], result["delivered"])
                print(f"  counts per delivery: {json.dumps(table)}", flush=True)
            if result.get("statements"):
                from statements import per_delivery as statement_lines

                for line in statement_lines(result["statements"], result["delivered"]):
                    print(f"  statements: {line}", flush=True)
    for label in rate:
        print(f"{label}: delivered/s {spread(rate[label])}; us CPU/delivery {spread(cpu[label])}")
    if len(trees) == 2:
        a, b = (label for label, _, _ in trees)
        for name, figures in (("delivered/s", rate), ("us CPU/delivery", cpu)):
            ratios = [y / x for x, y in zip(figures[a], figures[b], strict=True)]
            print(f"B/A {name}: {spread(ratios)}")
        for name, figures in (("delivered/s", rate), ("us CPU/delivery", cpu)):
            ratios = [y / x for x, y in zip(figures["plain"], figures[b], strict=True)]
            print(f"B/plain {name}: {spread(ratios)}")


def callgrind(args: argparse.Namespace, port: int, workdir: Path) -> None:
    per: dict[str, list[float]] = {}
    trees = variants(args)
    conv = args.conversations
    for number in range(args.rounds):
        for label, tree, mode in trees if number % 2 == 0 else trees[::-1]:
            runs = [
                # Twice the conversations too: as many deliveries per conversation in both.
                spawn(args, tree, "drain", port, workdir, n * args.count, True, mode, n * conv)
                for n in (1, 2)
            ]
            small, large = runs
            delivered = large["delivered"] - small["delivered"]
            each = (large["instructions"] - small["instructions"]) / delivered
            per.setdefault(label, []).append(each)
            if args.by_library:
                split = ", ".join(
                    f"{name} {(large['groups'][name] - small['groups'][name]) / delivered:,.0f}"
                    for name in large["groups"]
                )
                print(f"round {number + 1} {label}, per delivery: {split}", flush=True)
            print(
                f"round {number + 1} {label}: {each:,.0f} instructions per delivery "
                f"({small['instructions']:,} for {small['delivered']}, "
                f"{large['instructions']:,} for {large['delivered']}; claims "
                f"{small['claims']} and {large['claims']}; {large['gateway']})",
                flush=True,
            )
    for label, figures in per.items():
        print(f"{label}: instructions per delivery {spread(figures)}")
    if len(trees) == 2:
        a, b = (per[label] for label, _, _ in trees)
        ratios = [y / x for x, y in zip(a, b, strict=True)]
        print(f"B/A instructions per delivery: {spread(ratios)}")


if __name__ == "__main__":
    sys.exit(main())
