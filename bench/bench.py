#!/usr/bin/env python3
"""The project's own benchmark: ack path, end to end, new connections, workers, backlog memory.

Rule: every figure comes from public tools run against the real gateway on 127.0.0.1 -- ApacheBench
(``ab`` with the client certificate via ``-E``) for load, the shared benchmark's ``sink.py`` as the
target, ``/proc`` and ``/usr/bin/time -v`` for CPU and memory, ``py-spy`` for profiles -- and every
phase is bounded in time and in count. The gateway is started through ``candidate.sh`` beside this
file, so it runs with exactly the config the shared harness gives it. Everything started here is
stopped here, by process id.

Phases (``--phases``, default all but ``profile``):

  ka        ack path, keep-alive: req/s and p50/p99 over ``--duration`` s, target up
  e2e       ``--e2e-count`` notifications acknowledged *and* delivered: delivered/s
  new       a new TCP connection and full mTLS handshake per request
  workers   [listen] workers = 1 and 2, unpinned, keep-alive and new connections
  backlog   target down: ``--backlog`` notifications in ``--chunks`` chunks; ack latency of the
            first and last chunk, gateway RSS after each, VmHWM and /usr/bin/time's max RSS
  drain     ``--drain-count`` notifications stored with the target down (short retry waits), then
            the target comes up: how fast the dispatcher alone empties the outbox
  shared    ``--outbox postgres`` only: two gateways sharing one database against one, keep-alive
            acks (``ab`` on each, half the concurrency each) and the same unpinned gateway alone
  profile   py-spy under keep-alive and new-connection load (every busy thread, then only the
            thread holding the GIL) and on the dispatcher alone (a drain of
            ``--profile-drain-count``): where the time goes, top functions by self and total
            samples, and the CPU of each thread of the gateway

``--outbox postgres`` runs every phase on the PostgreSQL outbox: a throw-away server is started
here (tests/support/pgserver.py: as an unprivileged user, durable settings, a Unix socket), one new
database per gateway, stopped at the end.

Usage: bench.py --sink PATH/TO/sink.py [--phases ka,e2e] [--json out.json]   (see README.md)
"""

# ruff: noqa: S603, S607
# S603/S607: this script's job is to start ab, taskset, py-spy and the gateway as subprocesses,
# with argument lists built here (never a shell string), found on PATH like any command line tool.

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import hashlib
import hmac
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "support"))  # the throw-away PostgreSQL server of the tests
CLIENT_CN = "client.webhooks.fbclientcerts.com"
CLK_TCK = os.sysconf("SC_CLK_TCK")
ALL_PHASES = ("ka", "e2e", "new", "workers", "backlog", "drain", "shared", "profile")
# Retry waits for the drain phase: every stored delivery is due again within a second of the
# target coming back, so the drain measures the dispatcher, not the backoff.
SHORT_WAITS = "wait_initial_s = 0.2\nwait_max_s = 1"


def revision() -> str | None:
    """The checkout's commit (``-dirty`` with local changes), if this is a git checkout."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(["git", "-C", str(HERE.parent), "describe", "--always", "--dirty"],
                              capture_output=True, text=True, check=True).stdout.strip()
    return None


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


# -- certificates and payload -------------------------------------------------------------------


def make_certs(folder: Path) -> dict[str, Path]:
    """A CA standing in for Meta's, a server certificate for 127.0.0.1 and Meta's client leaf."""
    import trustme

    ca = trustme.CA(organization_name="Stand-in for Meta's client CA")
    server = ca.issue_cert("127.0.0.1", "localhost", common_name="localhost")
    client = ca.issue_cert(CLIENT_CN, common_name=CLIENT_CN)
    paths = {name: folder / name for name in ("ca.pem", "server.pem", "server.key", "client.pem")}
    ca.cert_pem.write_to_path(str(paths["ca.pem"]))
    paths["server.pem"].write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    server.private_key_pem.write_to_path(str(paths["server.key"]))
    # ab -E wants the certificate chain, then the key, in one file.
    chain = b"".join(blob.bytes() for blob in client.cert_chain_pems)
    paths["client.pem"].write_bytes(chain + client.private_key_pem.bytes())
    return paths


def default_payload() -> bytes:
    """A WhatsApp Cloud API inbound text message notification (one change, one message)."""
    notification = {
        "object": "whatsapp_business_account",
        "entry": [{"id": "102290129340398", "changes": [{"field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550783881",
                         "phone_number_id": "106540352242922"},
            "contacts": [{"profile": {"name": "Sheena Nelson"}, "wa_id": "16505551234"}],
            "messages": [{"from": "16505551234", "id": "wamid." + "A" * 52,
                          "timestamp": "1749416383", "type": "text",
                          "text": {"body": "Does it come in another colour?"}}],
        }}]}],
    }
    return json.dumps(notification, separators=(",", ":")).encode()


# -- processes -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = collections.defaultdict(list)
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{name}/stat").read_text()
                kids[int(stat[stat.rindex(")") + 2 :].split()[1])].append(int(name))
    return kids


def tree(root: int) -> list[int]:
    kids, found, todo = children(), [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(kids.get(pid, []))
    return found


def cpu_ticks(root: int) -> int:
    total = 0
    for pid in tree(root):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])
    return total


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of one process, in KiB."""
    found = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0])
    return found


def pinned(argv: list[str], cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus, *argv] if cpus else argv


class Proc:
    """A started process tree, stopped by its process ids (SIGTERM, then SIGKILL)."""

    def __init__(self, name: str, argv: list[str], logdir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_path = logdir / f"{name}.log"
        with self.log_path.open("wb") as out:
            self.popen = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, first: int | None = None) -> None:
        """SIGTERM ``first`` (default the root), wait, then SIGTERM/SIGKILL whatever is left."""
        pids = tree(self.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(first or self.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=15)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            left = [pid for pid in pids if Path(f"/proc/{pid}").exists() and pid != self.pid]
            for pid in left + ([self.pid] if self.alive() else []):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in left):
                time.sleep(0.05)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)


def wait_listening(port: int, proc: Proc, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise SystemExit(f"{proc.name} exited:\n{proc.tail()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise SystemExit(f"{proc.name} did not listen on {port} within {timeout_s:g}s:\n{proc.tail()}")


def sink_get(port: int, path: str) -> dict[str, int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        return dict(json.loads(conn.getresponse().read()))
    finally:
        conn.close()


# -- the gateway ---------------------------------------------------------------------------------


class Gateway:
    """The gateway started through candidate.sh, under /usr/bin/time -v when that exists."""

    def __init__(self, bench: Bench, name: str, *, target_port: int, workers: int = 1,
                 cpus: str | None = None, target_toml: str = "",
                 database: str | None = None, target_url: str | None = None) -> None:
        self.workdir = bench.tmp / name
        self.workdir.mkdir()
        self.port = free_port()
        self.pg = bench.pg
        self.database = database or name.replace("-", "_")
        extra = {}
        if self.pg is not None:
            if database is None:
                self.pg.psql(f"CREATE DATABASE {self.database}")
            extra["WABA_BENCH_OUTBOX_URL"] = self.pg.socket_url(self.database)
        env = dict(bench.env_base, **extra, BENCH_LISTEN_PORT=str(self.port),
                   BENCH_TARGET_URL=target_url or f"http://127.0.0.1:{target_port}/sink",
                   BENCH_WORKDIR=str(self.workdir), BENCH_CPUS=cpus or "all",
                   WABA_BENCH_WORKERS=str(workers), WABA_BENCH_TARGET_TOML=target_toml)
        argv = ["bash", str(HERE / "candidate.sh")]
        self.time_path = self.workdir / "time-v.txt"
        if Path("/usr/bin/time").exists():
            argv = ["/usr/bin/time", "-v", "-o", str(self.time_path), *argv]
        self.proc = Proc(name, pinned(argv, cpus), bench.tmp, env)
        wait_listening(self.port, self.proc, 30)
        self.url = f"https://127.0.0.1:{self.port}{bench.path}"
        self.outbox = self.workdir / "outbox.sqlite3"

    def python_pids(self) -> list[int]:
        """The gateway's Python processes (supervisor first, then workers), not time or taskset."""
        pids = []
        for pid in tree(self.proc.pid):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip().startswith("python"):
                    pids.append(pid)
        return pids

    def serving_pid(self) -> int:
        """With workers = 1: the one process that serves and dispatches."""
        return self.python_pids()[0]

    def pending(self) -> int:
        if self.pg is not None:
            return int(self.pg.psql(
                "SELECT COUNT(*) FROM waba_gateway.deliveries WHERE state = 'pending'",
                self.database))
        with contextlib.closing(sqlite3.connect(self.outbox, timeout=30)) as conn:
            row = conn.execute("SELECT COUNT(*) FROM deliveries WHERE state = 'pending'").fetchone()
        return int(row[0])

    def outbox_stats(self) -> dict[str, Any]:
        if self.pg is not None:
            rows = self.pg.psql("SELECT state, COUNT(*), SUM(attempts) FROM"
                                " waba_gateway.deliveries GROUP BY state", self.database)
            cells = [line.split("|") for line in rows.splitlines()]
            return {"states": {c[0]: int(c[1]) for c in cells},
                    "attempts": sum(int(c[2]) for c in cells)}
        with contextlib.closing(sqlite3.connect(self.outbox, timeout=30)) as conn:
            states = dict(conn.execute("SELECT state, COUNT(*) FROM deliveries GROUP BY state"))
            attempts = conn.execute("SELECT COALESCE(SUM(attempts), 0) FROM deliveries").fetchone()
        size = sum(p.stat().st_size for p in self.workdir.glob("outbox.sqlite3*"))
        return {"states": states, "attempts": int(attempts[0]), "file_bytes": size}

    def stop(self) -> dict[str, Any]:
        """Stop it; return /usr/bin/time's maximum resident set size (KiB) and exit code."""
        pids = self.python_pids()
        self.proc.stop(first=pids[0] if pids else None)
        found: dict[str, Any] = {}
        if self.time_path.exists():
            text = self.time_path.read_text()
            match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
            found["time_max_rss_kib"] = int(match.group(1)) if match else None
            match = re.search(r"Exit status: (\d+)", text)
            found["exit_status"] = int(match.group(1)) if match else None
        return found


# -- load ----------------------------------------------------------------------------------------


def ab_argv(bench: Bench, url: str, *, keepalive: bool, duration_s: int | None = None,
            count: int | None = None) -> list[str]:
    """ab posting the signed payload with Meta's client certificate, ``-c --concurrency``."""
    argv = ["ab", "-q", "-r", "-l", "-s", "30", "-c", str(bench.args.concurrency)]
    if duration_s is not None:
        argv += ["-t", str(duration_s), "-n", "5000000"]  # -n after -t: -t alone caps at 50,000
    else:
        argv += ["-n", str(count)]
    argv += ["-p", str(bench.payload_path), "-T", "application/json",
             "-H", f"X-Hub-Signature-256: {bench.signature}", "-E", str(bench.certs["client.pem"])]
    return [*argv, "-k", url] if keepalive else [*argv, url]


def run_ab(bench: Bench, url: str, *, keepalive: bool, duration_s: int | None = None,
           count: int | None = None, cpus: str | None = None) -> dict[str, Any]:
    """One ab run, bounded by ``duration_s`` or ``count`` (and a hard timeout)."""
    csv_path = bench.tmp / "ab-percentiles.csv"
    csv_path.unlink(missing_ok=True)
    argv = ab_argv(bench, url, keepalive=keepalive, duration_s=duration_s, count=count)
    argv[-1:-1] = ["-e", str(csv_path)]
    hard_limit = (duration_s or 0) + (count or 0) / 200 + 60
    started = time.monotonic()
    done = subprocess.run(pinned(argv, cpus), capture_output=True, text=True, timeout=hard_limit,
                          check=False)
    wall = time.monotonic() - started

    def number(pattern: str) -> float:
        match = re.search(pattern, done.stdout, re.M)
        return float(match.group(1)) if match else 0.0

    percentiles = {}
    with contextlib.suppress(OSError), csv_path.open() as file:
        for row in csv.reader(file):
            if row and row[0].isdigit():
                percentiles[int(row[0])] = float(row[1])
    result = {
        "complete": int(number(r"^Complete requests:\s+(\d+)")),
        "errors": int(number(r"^Failed requests:\s+(\d+)")
                      + number(r"^Non-2xx responses:\s+(\d+)")),
        "rps": number(r"^Requests per second:\s+([\d.]+)"),
        "p50_ms": percentiles.get(50),
        "p99_ms": percentiles.get(99),
        "wall_s": round(wall, 2),
    }
    if done.returncode != 0 or not result["complete"]:
        result["ab_error"] = (done.stderr or done.stdout).strip()[-300:]
    return result


def measure(bench: Bench, gateway: Gateway, *, cpus: str | None, **ab: Any) -> dict[str, Any]:
    """ab against ``gateway`` with the gateway's CPU use (100 = one core) over the run."""
    ticks, started = cpu_ticks(gateway.proc.pid), time.monotonic()
    result = run_ab(bench, gateway.url, cpus=cpus, **ab)
    result["gw_cpu_pct"] = round(
        100 * (cpu_ticks(gateway.proc.pid) - ticks) / CLK_TCK / (time.monotonic() - started), 1)
    return result


def warm_up(bench: Bench, gateway: Gateway, cpus: str | None) -> None:
    result = run_ab(bench, gateway.url, keepalive=True, duration_s=1, cpus=cpus)
    if not result["complete"] or result["errors"]:
        raise SystemExit(f"warm-up failed: {result}\n{gateway.proc.tail()}")
    time.sleep(0.5)


def wait_drained(gateway: Gateway, limit_s: float) -> float | None:
    """Seconds until no delivery is pending, or None after ``limit_s``."""
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        if gateway.pending() == 0:
            return time.monotonic() - started
        time.sleep(0.05)
    return None


# -- profiles ------------------------------------------------------------------------------------


def py_spy(pid: int, seconds: int, out: Path, cpus: str | None, mode: str) -> Path:
    """Record ``seconds`` of samples of ``pid`` in py-spy's raw (collapsed stack) format, one
    stack per thread, without pausing the gateway. ``mode``: "wall" samples every thread that is
    not idle (a thread inside fsync counts as busy); "gil" only the thread holding the GIL, i.e.
    where the interpreter's time goes. (``--native`` needs the process paused for each sample,
    which here cut the gateway's throughput by two thirds: not used.)"""
    argv = ["py-spy", "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "250",
            "--format", "raw", "--threads", "--output", str(out)]
    argv += ["--nonblocking"] + (["--gil"] if mode == "gil" else [])
    subprocess.run(pinned(argv, cpus), capture_output=True, timeout=seconds + 60, check=True)
    return out


def thread_cpu(pid: int) -> dict[int, tuple[int, int]]:
    """CPU ticks of each thread of ``pid``: (user, system), from /proc/PID/task/TID/stat."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            stat = (task / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            found[int(task.name)] = (int(fields[11]), int(fields[12]))
    return found


def thread_ticks(pid: int) -> dict[int, int]:
    """CPU ticks (user + system) of each thread of ``pid``."""
    return {tid: user + system for tid, (user, system) in thread_cpu(pid).items()}


# Where a sample's time goes, by the first rule whose text its stack contains (in this order).
# The keys are function and file names as py-spy prints them ("name (path:line)"), so they must
# follow the code: tests/project/test_bench.py checks that each one still exists in the package.
PARTS = (
    ("writer: store a notification (accept)", "insert_notification ("),
    ("writer: find due deliveries (due)", "due_deliveries ("),
    ("writer: record an attempt (record)", "record_attempts ("),
    ("writer: BEGIN, COMMIT (fsync), batching", "_transaction (gateway/outbox/sqlite/writer.py"),
    ("writer: BEGIN, COMMIT (fsync), batching", "_commit (gateway/outbox/sqlite/writer.py"),
    ("writer: waiting for jobs", "outbox-writer"),
    ("loop: dispatcher and forwarder", "gateway/delivery/"),
    ("loop: webhook request handler", "gateway/edge/"),
    ("loop: admin listener (aiohttp server)", "aiohttp/web_"),
    ("loop: TLS handshakes", "SSLObject.do_handshake"),
    ("loop: event loop itself (uvloop's C code, I/O)", "MainThread;"),
)


DISPATCH = ("gateway/delivery/",)


def top_functions(raw: Path, only: tuple[str, ...] = (), n: int = 15) -> dict[str, Any]:
    """Functions by self samples (leaf frame) and by total samples (anywhere on the stack), the
    leaf lines by self samples, and the share of each of :data:`PARTS`; with ``only``, just the
    stacks that contain one of those texts."""
    self_count: collections.Counter[str] = collections.Counter()
    total_count: collections.Counter[str] = collections.Counter()
    line_count: collections.Counter[str] = collections.Counter()
    parts: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or (only and not any(text in stack for text in only)):
            continue
        count = int(number)
        thread, *frames = stack.split(";")
        samples += count
        if frames:
            line_count[frames[-1]] += count
            self_count[re.sub(r":\d+\)$", ")", frames[-1])] += count
        for frame in {re.sub(r":\d+\)$", ")", f) for f in frames}:
            total_count[frame] += count
        text = thread.split(": ", 1)[-1] + ";" + ";".join(frames)
        parts[next((name for name, key in PARTS if key in text), "other threads")] += count

    def share(counter: collections.Counter[str], k: int = n) -> list[tuple[str, int, float]]:
        return [(f, c, round(100 * c / samples, 1)) for f, c in counter.most_common(k)]

    return {"samples": samples, "parts": share(parts, len(PARTS) + 1), "self": share(self_count),
            "total": share(total_count), "self_lines": share(line_count, 10)}


def print_top(title: str, top: dict[str, Any]) -> None:
    print(f"\n{title}: {top['samples']} samples (250 Hz, threads not idle)")
    for kind in ("parts", "self", "total", "self_lines"):
        print(f"  by {kind}:")
        for frame, count, pct in top[kind]:
            print(f"    {pct:5.1f}%  {count:>7}  {frame}")


# -- phases --------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.path = "/webhook"
        self.certs = make_certs(tmp)
        body = Path(args.payload).read_bytes() if args.payload else default_payload()
        self.payload_path = tmp / "payload.json"
        self.payload_path.write_bytes(body)
        secret = secrets.token_hex(16)  # Meta app secrets are 32 hex characters
        self.signature = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        self.body_sha256 = hashlib.sha256(body).hexdigest()
        self.env_base = dict(
            os.environ, BENCH_LISTEN_HOST="127.0.0.1", BENCH_TLS_CERT=str(self.certs["server.pem"]),
            BENCH_TLS_KEY=str(self.certs["server.key"]), BENCH_CLIENT_CA=str(self.certs["ca.pem"]),
            BENCH_CLIENT_CN=CLIENT_CN, BENCH_APP_SECRET=secret, BENCH_WEBHOOK_PATH=self.path)
        self.results: dict[str, Any] = {"meta": {
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "nproc": os.cpu_count(),
            "payload_bytes": len(body), "concurrency": args.concurrency,
            "duration_s": args.duration, "gw_cpus": args.gw_cpus, "load_cpus": args.load_cpus,
            "label": args.label, "revision": revision()}}
        self.procs: list[Proc] = []
        self.gateways: list[Gateway] = []
        self.pg: Any = None
        if args.outbox == "postgres":
            from pgserver import init_server  # only for this outbox

            self.pg = init_server()
            self.results["meta"]["outbox"] = "postgres"

    def sink(self, port: int, cpus: str | None) -> Proc:
        argv = [sys.executable, self.args.sink, "--port", str(port),
                "--expect-sha256", self.body_sha256]
        proc = Proc(f"sink-{port}", pinned(argv, cpus), self.tmp, dict(os.environ))
        self.procs.append(proc)
        wait_listening(port, proc, 10)
        return proc

    def gateway(self, name: str, **kwargs: Any) -> Gateway:
        gateway = Gateway(self, name, **kwargs)
        self.gateways.append(gateway)
        return gateway

    def stop_gateway(self, gateway: Gateway) -> dict[str, Any]:
        self.gateways.remove(gateway)
        return gateway.stop()

    def stop_all(self) -> None:
        for gateway in list(self.gateways):
            self.stop_gateway(gateway)
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()
        if self.pg is not None:
            with contextlib.suppress(subprocess.CalledProcessError):
                self.pg.stop("fast")
            shutil.rmtree(self.pg.folder, ignore_errors=True)
            self.pg = None

    def record(self, name: str, result: dict[str, Any]) -> None:
        self.results[name] = result
        log(f"{name}: {json.dumps(result)}")

    # Phases with the target up share one pinned gateway: ka, e2e, new.

    def pinned_phases(self, phases: list[str]) -> None:
        a = self.args
        sink_port = free_port()
        sink = self.sink(sink_port, a.load_cpus)
        gateway = self.gateway("gw-pinned", target_port=sink_port, cpus=a.gw_cpus)
        warm_up(self, gateway, a.load_cpus)
        wait_drained(gateway, 30)
        if "ka" in phases:
            sink_get(sink_port, "/__reset")
            result = measure(self, gateway, keepalive=True, duration_s=a.duration, cpus=a.load_cpus)
            result["drain_after_s"] = wait_drained(gateway, 60)
            result["forwarded"] = sink_get(sink_port, "/__stats")["requests"]
            self.record("ka", result)
        if "e2e" in phases:
            sink_get(sink_port, "/__reset")
            started = time.monotonic()
            result = measure(self, gateway, keepalive=True, count=a.e2e_count, cpus=a.load_cpus)
            acked = time.monotonic() - started
            drained = wait_drained(gateway, 120)
            stats = sink_get(sink_port, "/__stats")
            total = acked + (drained or 0)
            result.update(ack_s=round(acked, 2), drain_after_ack_s=drained,
                          delivered=stats["requests"], body_mismatch=stats["body_mismatch"],
                          delivered_per_s=round(stats["requests"] / total, 1))
            self.record("e2e", result)
        if "new" in phases:
            result = measure(self, gateway, keepalive=False, duration_s=a.duration,
                             cpus=a.load_cpus)
            result["drain_after_s"] = wait_drained(gateway, 60)
            self.record("new", result)
        result = self.stop_gateway(gateway)
        log(f"gw-pinned stopped: {result}")
        sink.stop()
        self.procs.remove(sink)

    def shared(self) -> None:
        """Two gateways sharing one database, each under ``ab`` with half the concurrency,
        against one gateway alone with all of it; nothing pinned (one core each, as on two
        hosts of this machine's size it would be two)."""
        if self.pg is None:
            log("shared: needs --outbox postgres; skipped")
            return
        sink_port = free_port()
        self.sink(sink_port, None)
        alone = self.gateway("gw-alone", target_port=sink_port)
        warm_up(self, alone, None)
        result: dict[str, Any] = {"one": run_ab(self, alone.url, keepalive=True,
                                                duration_s=self.args.duration)}
        result["one"]["drain_after_s"] = wait_drained(alone, 60)
        self.stop_gateway(alone)
        pair = [self.gateway(f"gw-shared{n}", target_port=sink_port,
                             database="gw_alone") for n in (1, 2)]
        for gateway in pair:
            warm_up(self, gateway, None)
        half = max(self.args.concurrency // 2, 1)
        argvs = [ab_argv(self, g.url, keepalive=True, duration_s=self.args.duration)
                 for g in pair]
        for argv in argvs:
            argv[argv.index("-c") + 1] = str(half)
        started = time.monotonic()
        runs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for argv in argvs]
        outputs = [run.communicate(timeout=self.args.duration + 60)[0] for run in runs]
        wall = time.monotonic() - started
        rps = [float(m.group(1)) if (m := re.search(r"^Requests per second:\s+([\d.]+)", out,
                                                      re.M)) else 0.0 for out in outputs]
        errors = [int(m.group(1)) if (m := re.search(r"^Failed requests:\s+(\d+)", out, re.M))
                  else -1 for out in outputs]
        result["two"] = {"rps_each": rps, "rps": round(sum(rps), 1), "errors": errors,
                         "wall_s": round(wall, 2), "drain_after_s": wait_drained(pair[0], 60)}
        for gateway in pair:
            self.stop_gateway(gateway)
        self.record("shared", result)

    def workers(self) -> None:
        """workers = 1 and 2 with nothing pinned: gateway, ab and sink share both cores."""
        sink_port = free_port()
        self.sink(sink_port, None)
        for count in (1, 2):
            gateway = self.gateway(f"gw-workers{count}", target_port=sink_port, workers=count)
            warm_up(self, gateway, None)
            result = {mode: measure(self, gateway, keepalive=mode == "ka",
                                    duration_s=self.args.duration, cpus=None)
                      for mode in ("ka", "new")}
            result["drain_after_s"] = wait_drained(gateway, 60)
            result["rss_kib"] = [memory_kib(pid) for pid in gateway.python_pids()]
            self.stop_gateway(gateway)
            self.record(f"workers{count}", result)

    def backlog(self) -> None:
        """Target down: store ``--backlog`` notifications; the dispatcher retries meanwhile."""
        a = self.args
        down_port = free_port()  # nothing listens there: every attempt is refused at once
        gateway = self.gateway("gw-backlog", target_port=down_port, cpus=a.gw_cpus)
        pid = gateway.serving_pid()
        chunk = max(a.backlog // a.chunks, 1)
        rows, started, loaded = [], time.monotonic(), 0
        while loaded < a.backlog and time.monotonic() - started < a.backlog_limit_s:
            count = min(chunk, a.backlog - loaded)
            result = measure(self, gateway, keepalive=True, count=count, cpus=a.load_cpus)
            loaded += result["complete"]
            result.update(loaded=loaded, elapsed_s=round(time.monotonic() - started, 1),
                          **memory_kib(pid))
            rows.append(result)
            log(f"backlog chunk: {json.dumps(result)}")
        outbox = gateway.outbox_stats()
        hwm = memory_kib(pid)
        stopped = self.stop_gateway(gateway)
        self.record("backlog", {"requested": a.backlog, "loaded": loaded, "chunks": rows,
                                "first": rows[0], "last": rows[-1], "final_memory_kib": hwm,
                                "outbox": outbox, **stopped})

    def drain(self, profile: Path | None = None) -> None:
        """Store ``--drain-count`` with the target down, bring it up, time the empty outbox."""
        a = self.args
        sink_port = free_port()
        gateway = self.gateway("gw-drain" + ("-profile" if profile else ""), target_port=sink_port,
                               cpus=a.gw_cpus, target_toml=SHORT_WAITS)
        count = a.profile_drain_count if profile else a.drain_count
        stored = measure(self, gateway, keepalive=True, count=count, cpus=a.load_cpus)
        self.sink(sink_port, a.load_cpus)
        started = time.monotonic()
        if profile:
            py_spy(gateway.serving_pid(), a.profile_s, profile, a.load_cpus, "wall")
        drained = wait_drained(gateway, 300)
        took = time.monotonic() - started
        delivered = sink_get(sink_port, "/__stats")["requests"]
        self.stop_gateway(gateway)
        if not profile:
            self.record("drain", {"stored": stored, "delivered": delivered,
                                  "drain_s": round(took, 2) if drained is not None else None,
                                  "delivered_per_s": round(delivered / took, 1)})

    def profile(self) -> None:
        """py-spy under keep-alive load and under new connections (every busy thread, then only
        the GIL holder), and on the dispatcher alone (the drain). With the target up, the
        keep-alive profile holds the whole end-to-end path: the dispatcher forwards while
        requests are acknowledged."""
        a = self.args
        out = Path(a.profile_dir or self.tmp)
        out.mkdir(parents=True, exist_ok=True)
        sink_port = free_port()
        sink = self.sink(sink_port, a.load_cpus)
        gateway = self.gateway("gw-profile", target_port=sink_port, cpus=a.gw_cpus)
        warm_up(self, gateway, a.load_cpus)
        files, threads = {}, {}
        for name, keepalive, mode in (("ack-ka", True, "wall"), ("ack-ka-gil", True, "gil"),
                                      ("ack-new", False, "wall"), ("ack-new-gil", False, "gil")):
            # The load runs while py-spy samples; ab's own -t bounds it.
            argv = ab_argv(self, gateway.url, keepalive=keepalive, duration_s=a.profile_s + 4)
            load = subprocess.Popen(pinned(argv, a.load_cpus), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            pid = gateway.serving_pid()
            try:
                time.sleep(1)
                before, started = thread_ticks(pid), time.monotonic()
                files[name] = py_spy(pid, a.profile_s, out / f"{name}.txt", a.load_cpus, mode)
                after, took = thread_ticks(pid), time.monotonic() - started
                # CPU % of one core per thread; the main thread's id is the process id.
                threads[name] = {("main" if tid == pid else str(tid)): round(
                    100 * (ticks - before.get(tid, 0)) / CLK_TCK / took, 1)
                    for tid, ticks in after.items() if ticks - before.get(tid, 0) > 0}
                log(f"thread CPU % during {name}: {threads[name]}")
            except subprocess.CalledProcessError as exc:
                log(f"py-spy {name} failed: {exc.stderr!r}")
            finally:
                load.wait(timeout=a.profile_s + 60)
            wait_drained(gateway, 60)
        self.stop_gateway(gateway)
        sink.stop()
        self.procs.remove(sink)
        self.drain(profile=out / "drain.txt")
        files["drain"] = out / "drain.txt"
        tops = {name: top_functions(path) for name, path in files.items()}
        for name in ("ack-ka", "ack-ka-gil"):
            if name in files:
                tops[f"{name}, dispatcher and forwarder stacks"] = top_functions(files[name],
                                                                                 DISPATCH)
        for name, top in tops.items():
            print_top(f"py-spy {name}", top)
        self.results["profile"] = dict(tops, thread_cpu_pct=threads,
                                       files={k: str(v) for k, v in files.items()})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sink", default=os.environ.get("WABA_BENCH_SINK"),
                        help="the shared benchmark's sink.py (default: $WABA_BENCH_SINK)")
    parser.add_argument("--phases", default="ka,e2e,new,workers,backlog,drain",
                        help=f"comma list of {', '.join(ALL_PHASES)}")
    parser.add_argument("--duration", type=int, default=10, help="seconds per timed ab run")
    parser.add_argument("-c", "--concurrency", type=int, default=32)
    parser.add_argument("--e2e-count", type=int, default=30_000)
    parser.add_argument("--backlog", type=int, default=100_000,
                        help="notifications stored while the target is down")
    parser.add_argument("--chunks", type=int, default=10,
                        help="the backlog is loaded in this many ab runs")
    parser.add_argument("--backlog-limit-s", type=float, default=600,
                        help="stop loading the backlog after this many seconds")
    parser.add_argument("--drain-count", type=int, default=20_000)
    parser.add_argument("--profile-drain-count", type=int, default=100_000,
                        help="--drain-count of the dispatcher's profile")
    parser.add_argument("--profile-s", type=int, default=15, help="py-spy sampling seconds")
    parser.add_argument("--profile-dir", help="keep py-spy's raw stacks here (default: temp dir)")
    parser.add_argument("--payload", help="notification body (default: a built-in text message)")
    parser.add_argument("--gw-cpus", default="0", help="taskset CPUs of the gateway ('' = none)")
    parser.add_argument("--load-cpus", default="1", help="taskset CPUs of ab, sink, py-spy")
    parser.add_argument("--json", help="write all results here")
    parser.add_argument("--outbox", choices=("sqlite", "postgres"), default="sqlite",
                        help="the outbox backend (postgres: a throw-away local server)")
    parser.add_argument("--label", help="free text kept with the results (e.g. the commit run)")
    parser.add_argument("--keep-tmp", action="store_true", help="keep certificates, logs, outboxes")
    args = parser.parse_args(argv)
    if not args.sink or not Path(args.sink).is_file():
        parser.error("--sink PATH/TO/sink.py (or $WABA_BENCH_SINK) is required")
    args.gw_cpus = args.gw_cpus or None
    args.load_cpus = args.load_cpus or None
    return args


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(phases) - set(ALL_PHASES)
    tools = ["ab", "taskset"] + (["py-spy"] if "profile" in phases else [])
    if unknown or any(shutil.which(tool) is None for tool in tools):
        log(f"unknown phases {sorted(unknown)}" if unknown else f"needs {', '.join(tools)}")
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="waba-bench-"))
    bench = Bench(args, tmp)
    signal.signal(signal.SIGTERM, interrupt)  # stop everything started, as on Ctrl-C
    try:
        if {"ka", "e2e", "new"} & set(phases):
            bench.pinned_phases(phases)
        if "workers" in phases:
            bench.workers()
        if "backlog" in phases:
            bench.backlog()
        if "drain" in phases:
            bench.drain()
        if "shared" in phases:
            bench.shared()
        if "profile" in phases:
            bench.profile()
    except KeyboardInterrupt:
        log("interrupted")
    finally:
        bench.stop_all()
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    out = args.json or str(tmp.with_suffix(".json"))
    Path(out).write_text(json.dumps(bench.results, indent=1))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
