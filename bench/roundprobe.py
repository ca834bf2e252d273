"""What the gateway did during each measured ``ab`` run of the shared harness, beside its rate.

Rule: read only what the gateway and the kernel count anyway (the admin API's ``/metrics``, the
candidate's ``/proc/PID/task/*``, ``/proc/loadavg``, ``/proc/stat``), before and after the run,
so that nothing measured changes. ``harness.py`` wraps the harness's ``Proc`` (to know the
candidate's process and folder) and ``run_ab`` (to take the readings around each measured run),
then adds them to each candidate run of the harness's JSON as ``probe``:

- ``commits``, ``jobs``: the outbox writer's group transactions (each one fsync) and the jobs
  they held, over the run (from ``waba_gateway_outbox_commits``/``_jobs``, when the candidate's
  admin API listens on ``$WABA_BENCH_ADMIN_PORT``);
- ``threads``: per thread of the gateway's process (the main one runs the event loop), CPU
  ticks, voluntary and involuntary context switches, and the CPU it last ran on;
- ``outbox_bytes``: the size of the outbox file and its log when the run began;
- ``loadavg``: the one-minute load average when it began, ``steal``: the machine's steal time
  share over the run (every core); ``softirq``: ticks each CPU spent in softirqs and each
  ``ksoftirqd`` thread ran (loopback TCP's receive work is charged to the process that was on
  the CPU, the gateway's share of it, unless the kernel defers it to ``ksoftirqd``);
- ``speed_us``: the CPU time (not wall time) a fixed piece of Python work (interpreter loop,
  SHA-256, JSON) takes on the gateway's CPU, just before and just after the run, the median of
  several: on a virtual machine the host's other guests can slow a virtual CPU per instruction
  (a shared physical core) without any steal time showing, and this says so per run.

Why these: the same revision's CPU per keep-alive request came in two levels from one round to
the next, and the writer's group size, where the threads ran and what else ran then are what
could make them (bench/README.md, "Comparing two revisions").
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import statistics
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Probe"]

_COUNTER = re.compile(r"^(waba_gateway_outbox_(?:commits|jobs))_total(?:\{[^}]*\})? ([0-9.e+]+)$",
                      re.MULTILINE)


def _metrics(port: int | None) -> dict[str, float]:
    if port is None:
        return {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    except OSError:
        return {}
    return {name: float(value) for name, value in _COUNTER.findall(text)}


def _threads(pid: int) -> dict[int, tuple[int, int, int, int]]:
    """Per thread id: CPU ticks (user + system), voluntary and involuntary switches, last CPU."""
    found: dict[int, tuple[int, int, int, int]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/task/{tid}/status") as status:
                lines = dict(line.split(":", 1) for line in status if ":" in line)
        except OSError:
            continue
        found[int(tid)] = (int(fields[11]) + int(fields[12]),
                           int(lines["voluntary_ctxt_switches"]),
                           int(lines["nonvoluntary_ctxt_switches"]), int(fields[36]))
    return found


def _steal() -> tuple[int, int]:
    with open("/proc/stat") as stat:
        parts = stat.readline().split()
    values = [int(value) for value in parts[1:9]]
    return sum(values), values[7]


def _softirq() -> dict[str, int]:
    """Per CPU, the ticks spent in softirqs (loopback TCP's receive side runs there: charged
    to whichever process was on the CPU, unless it is deferred to that CPU's ksoftirqd), and
    each ksoftirqd thread's own ticks."""
    found: dict[str, int] = {}
    with open("/proc/stat") as stat:
        for line in stat:
            if line.startswith("cpu") and line[3].isdigit():
                parts = line.split()
                found[f"softirq/{parts[0]}"] = int(parts[7])
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as stat:
                text = stat.read()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        if comm.startswith("ksoftirqd/"):
            fields = text.rsplit(")", 1)[1].split()
            found[comm] = int(fields[11]) + int(fields[12])
    return found


_SAMPLE = json.dumps({"entry": [{"changes": [{"value": {"messages": [{"text": "x" * 200}]}}]}]})


def _work() -> int:
    total = 0
    for i in range(20_000):
        total += i * i % 7
    for _ in range(200):
        total += len(json.loads(_SAMPLE))
        total += hashlib.sha256(_SAMPLE.encode() * 4).digest()[0]
    return total


def speed_us(cpus: set[int] | None, repeats: int = 7) -> float:
    """The median CPU time (us) of :func:`_work` on ``cpus``: the same instructions each time,
    so it moves only with what the virtual CPU does per instruction (cache, a shared core)."""
    before = os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, cpus)
    try:
        times = []
        for _ in range(repeats):
            start = time.thread_time()
            _work()
            times.append(1e6 * (time.thread_time() - start))
        return statistics.median(times)
    finally:
        os.sched_setaffinity(0, before)


def _python_pid(root: int) -> int:
    """The gateway's own process: ``bash -c CMD`` execs into it, or has it as its only child."""
    try:
        with open(f"/proc/{root}/task/{root}/children") as children:
            kids = children.read().split()
    except OSError:
        return root
    return int(kids[0]) if len(kids) == 1 else root


@dataclass
class Probe:
    """Readings around each measured run of the candidate, in the order the harness ran them."""

    candidate: str = "candidate"
    admin_port: int | None = None
    procs: dict[str, Any] = field(default_factory=dict)  # harness Proc by name
    ports: dict[str, str] = field(default_factory=dict)  # listening port -> Proc name
    taken: list[dict[str, Any]] = field(default_factory=list)

    def started(self, proc: Any, name: str, env: dict[str, str]) -> None:
        self.procs[name] = proc
        if "BENCH_LISTEN_PORT" in env:
            self.ports[env["BENCH_LISTEN_PORT"]] = name

    def around(self, url: str, measured: bool, run: Any) -> Any:
        """Call ``run()`` (one ab run); take readings around it when it measures the candidate."""
        port = url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[-1]
        proc = self.procs.get(self.ports.get(port, ""))
        if not measured or proc is None or self.ports.get(port) != self.candidate:
            return run()
        pid = _python_pid(proc.pid)
        folder = os.path.dirname(proc.logpath)
        size = sum(os.path.getsize(os.path.join(folder, name))
                   for name in ("outbox.sqlite3", "outbox.sqlite3-wal")
                   if os.path.exists(os.path.join(folder, name)))
        with open("/proc/loadavg") as loadavg:
            load = float(loadavg.read().split()[0])
        cpus = os.sched_getaffinity(pid) if os.path.exists(f"/proc/{pid}") else None
        speed = [speed_us(cpus)]
        m0, t0, s0, q0 = _metrics(self.admin_port), _threads(pid), _steal(), _softirq()
        result = run()
        m1, t1, s1, q1 = _metrics(self.admin_port), _threads(pid), _steal(), _softirq()
        speed.append(speed_us(cpus))
        threads = []
        for tid, after in sorted(t1.items()):
            before = t0.get(tid, (0, 0, 0, after[3]))
            threads.append({"tid": tid, "main": tid == pid, "ticks": after[0] - before[0],
                            "voluntary": after[1] - before[1],
                            "involuntary": after[2] - before[2], "cpu": after[3]})
        reading: dict[str, Any] = {
            "loadavg": load, "outbox_bytes": size, "threads": threads, "speed_us": speed,
            "steal": round(100 * (s1[1] - s0[1]) / (s1[0] - s0[0]), 2) if s1[0] > s0[0] else None,
            "softirq": {name: q1[name] - q0.get(name, 0) for name in q1}}
        for name in ("commits", "jobs"):
            key = f"waba_gateway_outbox_{name}"
            if key in m0 and key in m1:
                reading[name] = m1[key] - m0[key]
        self.taken.append(reading)
        return result

    def annotate(self, result: dict[str, Any]) -> None:
        """Add the readings to the candidate's runs of the harness's JSON, in order."""
        runs = [run for run in result.get("runs", []) if run.get("target") == self.candidate]
        for run, reading in zip(runs, self.taken, strict=False):
            run["probe"] = reading
