#!/usr/bin/env python3
"""Where each microsecond goes: the gateway's CPU per request, split by stage, from a real run.

Rule: nothing is estimated from code. The gateway runs pinned to one core (as in ``bench.py``)
under ``ab -k`` with the target up, so the ack path and the delivery path both run; py-spy
samples every busy thread for ``--duration`` seconds while ``/proc`` counts each thread's CPU
time and the sink counts what was delivered. Each thread's CPU time is shared among its samples'
stages in proportion to the samples, and divided by the notifications delivered in the window
(in steady state acknowledged = delivered; ``bench.py``'s ``ka`` phase shows it).

A sample's stage is that of the innermost frame a rule of :data:`STAGES` matches (rules in
order), so the HMAC inside the callback counts as "signature" and the TLS encryption inside an
answer's write as "TLS records". Frames of C code py-spy cannot see (uvloop's own I/O, OpenSSL
under ``ssl.py``, SQLite under ``execute``) count with the Python frame that called them;
samples of the event loop thread with no frame of ours are "event loop and I/O".

Usage:
  bench/stages.py --sink SHARED/sink.py --payload SHARED/payload.json [--duration 10]
  bench/stages.py ... --python VENV/bin/python   (a revision installed there, e.g. by
                                                 bench/compare.py --workdir)
"""

# ruff: noqa: S603
# S603: this script starts ab, py-spy and the gateway, with argument lists built here.

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# (stage, texts): a frame belongs to the first stage one of whose texts it contains. Frames read
# "Class.function (path/file.py:line)"; texts name functions as "function (" or ".function (",
# and files as "/file.py:" so that both layouts (gateway/edge/listener.py now, gateway/listener.py
# at 6c59f5d) match. tests/project/test_bench.py checks that each named function still exists.
ACK = (
    "TLS handshake",
    "TLS records",
    "HTTP framing",
    "identity",
    "signature",
    "JSON and routing",
    "outbox hand-off and commit",
    "response",
)
DELIVERY = ("claim", "upstream request and answer", "recording the outcome")
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("TLS handshake", ("do_handshake (",)),
    ("identity", ("identify (", "check_client_identity (", "getpeercert (")),
    ("TLS records", ("(ssl.py:", "(asyncio/sslproto.py:")),
    ("signature", ("verify_signature (",)),
    ("JSON and routing", ("route (", "/routing.py:", "/jsontext.py:")),
    ("recording the outcome", ("record_attempts (", "record_many (", "_attempt (gateway/outbox")),
    ("claim", ("due_deliveries (", "_claim (", ".due (", ".offer (")),
    (
        "outbox hand-off and commit",
        ("/writer.py:", "/store.py:", "/outbox.py:", "/outbox/", "/committer.py:", "(asyncpg/"),
    ),
    (
        "upstream request and answer",
        ("/upstream.py:", "/forwarder.py:", "/dispatcher.py:", "/delivery/"),
    ),
    (
        "response",
        (
            "._answer (",
            "._notified (",
            "log_access (",
            ".answered (",
            "/responses.py:",
            "/stats.py:",
            "/metrics.py:",
        ),
    ),
    (
        "HTTP framing",
        (
            " (gateway/edge/http1.py:",
            " (gateway/edge/listener.py:",
            " (gateway/listener.py:",
            "httptools",
        ),
    ),
    ("callback (the steps' glue)", ("/callback.py:",)),
)
LOOP = "event loop and I/O"
OTHER = "other threads"


def stage_of(thread: str, frames: Sequence[str]) -> str:
    """The stage of one sample: ``frames`` from the root to the leaf, as py-spy prints them."""
    for frame in reversed(frames):
        for stage, texts in STAGES:
            if any(text in frame for text in texts):
                return stage
    return LOOP if thread == "MainThread" else OTHER


def samples_by_thread(lines: Iterable[str]) -> dict[int, collections.Counter[str]]:
    """py-spy's raw output (``thread (TID): NAME;frame;...;frame COUNT``): stage counts per tid."""
    found: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in lines:
        stack, _, number = line.rpartition(" ")
        if not stack.startswith("thread ("):
            continue
        head, *frames = stack.split(";")
        tid_text, _, name = head.removeprefix("thread (").partition("): ")
        tid = int(tid_text, 16) if tid_text.startswith("0x") else int(tid_text)
        found[tid][stage_of(name, frames)] += int(number)
    return found


def thread_names(lines: Iterable[str]) -> dict[int, str]:
    """Each sampled thread's name, by tid, from py-spy's raw output."""
    names = {}
    for line in lines:
        head = line.rpartition(" ")[0].split(";", 1)[0]
        if head.startswith("thread ("):
            tid_text, _, name = head.removeprefix("thread (").partition("): ")
            names[int(tid_text, 16) if tid_text.startswith("0x") else int(tid_text)] = name
    return names


def thread_switches(pid: int) -> dict[int, int]:
    """Voluntary context switches of each thread of ``pid`` (a thread that waits, then wakes:
    the outbox writer's count is its wake-ups, about one per group commit)."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    found[int(task.name)] = int(line.split()[1])
    return found


def per_request(
    samples: dict[int, collections.Counter[str]], cpu_s: dict[int, float], requests: int
) -> dict[str, float]:
    """Microseconds of CPU per request by stage: each thread's CPU shared by its samples."""
    spent: collections.Counter[str] = collections.Counter()
    for tid, seconds in cpu_s.items():
        counts = samples.get(tid)
        if not counts:
            spent["threads not sampled"] += seconds
            continue
        total = sum(counts.values())
        for stage, count in counts.items():
            spent[stage] += seconds * count / total
    return {stage: 1e6 * seconds / requests for stage, seconds in spent.items()}


def table(figures: dict[str, float]) -> list[str]:
    total = sum(figures.values())
    rows = ["| path | stage | CPU per request (us) | share |", "| --- | --- | --- | --- |"]
    order = [*ACK, *DELIVERY, "callback (the steps' glue)", LOOP, OTHER, "threads not sampled"]
    for stage in order + sorted(set(figures) - set(order)):
        if stage not in figures:
            continue
        path = "ack" if stage in ACK else "delivery" if stage in DELIVERY else ""
        share = 100 * figures[stage] / total
        rows.append(f"| {path} | {stage} | {figures[stage]:.1f} | {share:.0f} % |")
    rows.append(f"| | **total** | **{total:.1f}** | |")
    return rows


def measure(args: argparse.Namespace) -> dict[str, Any]:
    # The sibling script, imported as kinds.py and ordering.py import it (this folder is first
    # on sys.path when the script runs); here, when measuring, so that a test may load this
    # module for its pure functions alone.
    import bench
    tmp = Path(tempfile.mkdtemp(prefix="waba-stages-"))
    options = bench.parse_args(
        [
            "--sink",
            args.sink,
            "--payload",
            args.payload,
            "--duration",
            str(args.duration),
            "-c",
            str(args.concurrency),
            "--outbox",
            args.outbox,
        ]
    )
    runner = bench.Bench(options, tmp)
    try:
        sink_port = bench.free_port()
        runner.sink(sink_port, options.load_cpus)
        gateway = runner.gateway("gw-stages", target_port=sink_port, cpus=options.gw_cpus)
        bench.warm_up(runner, gateway, options.load_cpus)
        argv = bench.ab_argv(runner, gateway.url, keepalive=True, duration_s=args.duration + 4)
        load = subprocess.Popen(
            bench.pinned(argv, options.load_cpus),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        pid = gateway.serving_pid()
        try:
            time.sleep(1.5)
            delivered = bench.sink_get(sink_port, "/__stats")["requests"]
            before, switched = bench.thread_ticks(pid), thread_switches(pid)
            raw = bench.py_spy(pid, args.duration, tmp / "stages.txt", options.load_cpus, "wall")
            after, switches = bench.thread_ticks(pid), thread_switches(pid)
            delivered = bench.sink_get(sink_port, "/__stats")["requests"] - delivered
        finally:
            out, _ = load.communicate(timeout=args.duration + 60)
        cpu_s = {
            tid: (ticks - before.get(tid, 0)) / bench.CLK_TCK
            for tid, ticks in after.items()
            if ticks > before.get(tid, 0)
        }
        lines = raw.read_text().splitlines()
        figures = per_request(samples_by_thread(lines), cpu_s, delivered)
        names = thread_names(lines)
        wakeups = {
            names.get(tid, str(tid)): round((count - switched.get(tid, 0)) / delivered, 3)
            for tid, count in switches.items()
            if count > switched.get(tid, 0)
        }
        if args.raw:
            shutil.copyfile(raw, args.raw)
        rate = next(
            (
                line.split()[3]
                for line in out.splitlines()
                if line.startswith("Requests per second")
            ),
            "?",
        )
        return {
            "revision": bench.revision() if not args.python else args.python,
            "delivered_in_window": delivered,
            "window_s": args.duration,
            "ab_rps": rate,
            "cpu_s_by_thread": cpu_s,
            "us_per_request": figures,
            "voluntary_switches_per_request_by_thread": wakeups,
        }
    finally:
        runner.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sink",
        default=os.environ.get("WABA_BENCH_SINK"),
        help="the shared harness's sink.py (default: $WABA_BENCH_SINK)",
    )
    parser.add_argument("--payload", required=True, help="the shared harness's payload.json")
    parser.add_argument("--duration", type=int, default=10, help="seconds sampled")
    parser.add_argument("-c", "--concurrency", type=int, default=32)
    parser.add_argument(
        "--python",
        help="run the gateway installed in this interpreter's environment instead of this checkout",
    )
    parser.add_argument(
        "--outbox",
        choices=("sqlite", "postgres"),
        default="sqlite",
        help="the outbox backend (postgres: a throw-away local server, as bench.py starts it)",
    )
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--raw", help="keep py-spy's samples (collapsed stacks) here")
    args = parser.parse_args(argv)
    if not args.sink:
        parser.error("--sink PATH/TO/sink.py (or $WABA_BENCH_SINK) is required")
    if args.python:
        os.environ["WABA_BENCH_PYTHON"] = args.python
        os.environ["WABA_BENCH_INSTALLED"] = "1"
    result = measure(args)
    print(
        f"{result['revision']}: {result['delivered_in_window']} delivered in "
        f"{result['window_s']} s sampled (ab: {result['ab_rps']} req/s)"
    )
    print("\n".join(table(result["us_per_request"])))
    switches = result["voluntary_switches_per_request_by_thread"]
    print(
        "voluntary context switches per request, by thread:",
        ", ".join(f"{name} {count}" for name, count in sorted(switches.items())),
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
