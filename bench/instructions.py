#!/usr/bin/env python3
"""Instructions per request: the gateway under callgrind, a fixed run, for changes too small
for a shared machine's timing to show.

Rule: a count, not a time. ``valgrind --tool=callgrind`` counts the instructions the gateway's
process executes (every thread: the event loop, the outbox writer), whatever else the machine
runs, so two revisions compare on one number even while other work shares the cores. Each
revision runs with its own ``bench/candidate.sh`` (features off: no tracing, one HTTP target,
``order = "none"``, no rate limit), the target is the shared harness's sink, and the client
posts the signed payload over one kept-alive mTLS connection, one request at a time, so every
request is its own group commit and the count does not depend on how requests happen to group.

Start-up is left out: after ``--warmup`` requests (and their deliveries) the counters are zeroed
(``callgrind_control -z``), ``--count`` requests are posted, and once the sink has every delivery
and the outcomes' lazy commit has run the counts are dumped (``callgrind_control -d``). The figure
is that dump's instructions over ``--count``: the ack path and the delivery path, plus the timers
that ran meanwhile (the listener's sweep and the metrics' flush, once a second each; the
dispatcher's poll is set to an hour), a few parts in a thousand at callgrind's pace;
``--rounds`` repeats the run and prints every figure.

``--concurrency 32`` posts over 32 kept-alive connections at once, as ``ab -c 32`` does: requests
then wait for the event loop and share its turns and the writer's group commits as under load
(at callgrind's pace every turn finds requests waiting), so a cost that only load brings out
(a second thread's hand-overs of the interpreter's lock, smaller or larger groups) is counted
too; how requests group then depends on the run, so compare such counts over several rounds.

Revisions are built as ``bench/compare.py`` builds them (``git archive``, a fresh venv, the plain
``pip install .``); ``.`` is this checkout as it is, uncommitted changes included.

``--kind redis`` or ``--kind nats`` sends to a Redis stream or a NATS JetStream stream instead
(Debian's ``redis-server`` / ``nats-server``, started for each run, outside callgrind), and a
request counts as delivered once the outbox has recorded it: the same count for each kind of
target, whose differences are then the senders' and what their timing does to the rest.

``--outbox postgres`` stores in the PostgreSQL outbox instead: one throw-away local server for
the whole run (``tests/support/pgserver.py``, durable: ``fsync`` and ``synchronous_commit`` on),
a new database for each run, so each revision creates its own schema version. Only the gateway's
process is counted, not the server's (``bench/pg_accept.py`` measures the server's CPU and WAL).

Usage:
  bench/instructions.py fbb3e16 HEAD --shared DIR [--count 2000] [--rounds 2] [--workdir W]
  bench/instructions.py . --kind redis --count 1000   (the whole gateway with a Redis target)
  bench/instructions.py fbb3e16 . --new --count 300   (new connections: the handshake and
                                                       what Python does around it)
  bench/instructions.py main . --outbox postgres --extras postgres --count 1000
  bench/instructions.py . --concurrency 32 --count 2000   (requests grouped as under load)
"""

# ruff: noqa: S603, S607
# S603/S607: this script runs valgrind and the gateway, with argument lists built here.

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
CLIENT_CN = "client.webhooks.fbclientcerts.com"
PATH = "/webhook"


def log(*parts: object) -> None:
    print(time.strftime("%H:%M:%S"), *parts, file=sys.stderr, flush=True)


class Client:
    """One kept-alive mTLS connection posting one request at a time (``new``: a connection of
    its own for each request)."""

    def __init__(self, port: int, certs: dict[str, Path], request: bytes, new: bool) -> None:
        self._context = ssl.create_default_context(cafile=str(certs["ca.pem"]))
        self._context.load_cert_chain(str(certs["client.pem"]))
        # No session resumption: every new connection is a full handshake, as Meta's are.
        self._context.options |= ssl.OP_NO_TICKET
        self._port = port
        self._new = new
        self._sock: ssl.SSLSocket | None = None
        self._request = request
        self._buffer = b""

    def _connect(self) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", self._port), timeout=600)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self._context.wrap_socket(raw, server_hostname="127.0.0.1")

    def post(self) -> int:
        if self._sock is None:
            self._sock = self._connect()
        try:
            return self._exchange(self._sock)
        finally:
            if self._new:
                self.close()

    def _exchange(self, sock: ssl.SSLSocket) -> int:
        self._buffer = b""
        sock.sendall(self._request)
        while b"\r\n\r\n" not in self._buffer:
            self._buffer += self._read()
        head, _, self._buffer = self._buffer.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
        while len(self._buffer) < length:
            self._buffer += self._read()
        self._buffer = self._buffer[length:]
        return int(head.split(b" ", 2)[1])

    def _read(self) -> bytes:
        assert self._sock is not None
        data = self._sock.recv(65536)
        if not data:
            raise SystemExit("the gateway closed the connection")
        return data

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


def _post_many(client: Client, count: int) -> int:
    """Post ``count`` requests one after another; the first status that is not 200, or 200."""
    for _ in range(count):
        status = client.post()
        if status != 200:
            return status
    return 200


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float, logfile: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the gateway exited:\n{logfile.read_text()[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.5)
    raise SystemExit(f"the gateway did not listen within {timeout_s:g}s")


def control(option: str, pid: int) -> None:
    """``callgrind_control -z`` (zero) or ``-d`` (dump) on the gateway's process."""
    # Without a process id callgrind_control acts on every callgrind run on the machine.
    assert pid > 0
    done = subprocess.run(["callgrind_control", option, str(pid)], capture_output=True,
                          text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise SystemExit(f"callgrind_control {option} failed: {done.stdout}{done.stderr}")


def until_delivered(bench: ModuleType, sink_port: int, count: int) -> None:
    deadline = time.monotonic() + 300
    while bench.sink_get(sink_port, "/__stats")["requests"] < count:
        if time.monotonic() > deadline:
            raise SystemExit("the sink did not receive every delivery")
        time.sleep(0.2)


def delivered_in(outbox: Path | tuple[object, str]) -> int:
    """The deliveries the outbox has recorded as delivered: a SQLite file, or (a running
    ``pgserver.PgServer``, database)."""
    query = "SELECT COUNT(*) FROM deliveries WHERE state = 'delivered'"
    if isinstance(outbox, tuple):
        server, database = outbox
        with contextlib.suppress(subprocess.CalledProcessError, ValueError):
            schema_query = query.replace("FROM ", "FROM waba_gateway.")
            return int(server.psql(schema_query, database))  # type: ignore[attr-defined]
        return 0
    with contextlib.suppress(sqlite3.Error), contextlib.closing(
        sqlite3.connect(outbox, timeout=30)
    ) as conn:
        return int(conn.execute(query).fetchone()[0])
    return 0


def until_recorded(outbox: Path | tuple[object, str], count: int) -> None:
    """Until the outbox has ``count`` deliveries recorded as delivered (a broker target: no
    sink to ask; the PostgreSQL outbox: also the outcomes' commit, which the sink cannot see)."""
    deadline = time.monotonic() + 300
    while True:
        if delivered_in(outbox) >= count:
            return
        if time.monotonic() > deadline:
            raise SystemExit("the outbox did not record every delivery")
        time.sleep(0.2)


@contextlib.contextmanager
def broker(kind: str) -> Iterator[tuple[str, str]]:
    """(url, extra TOML) of the run's one target: the sink's URL is filled in for "http"."""
    if kind == "http":
        yield "", ""
        return
    sys.path.append(str(HERE.parent / "tests" / "support"))
    from brokers import nats_server, redis_server

    if kind == "redis":
        with redis_server() as server:
            yield server.url, 'kind = "redis"\nstream = "bench"\nmaxlen = 100000'
        return
    with nats_server() as server:
        import asyncio

        import nats

        async def make() -> None:
            client = await nats.connect(server.url)
            try:
                await client.jetstream().add_stream(name="BENCH", subjects=["bench.>"])
            finally:
                await client.close()

        asyncio.run(make())
        yield server.url, 'kind = "nats"\nsubject = "bench.notifications"'


def one_run(args: argparse.Namespace, bench: ModuleType, python: Path, adapter: Path,
            installed: bool, work: Path) -> int:
    """Start the gateway under callgrind, warm it up, count ``--count`` requests and their
    deliveries; the instructions counted."""
    folder = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    certs = bench.make_certs(folder)
    body = Path(args.payload).read_bytes()
    secret = secrets.token_hex(16)
    signature = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    sink_port, port = bench.free_port(), bench.free_port()
    sink = subprocess.Popen([sys.executable, args.sink, "--port", str(sink_port),
                             "--expect-sha256", hashlib.sha256(body).hexdigest()],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    out = folder / "callgrind.out"
    wrapper = folder / "python-under-callgrind"
    wrapper.write_text(f"#!/bin/sh\nexec valgrind --tool=callgrind --callgrind-out-file={out} "
                       f"--dump-line=no --compress-strings=no {python} \"$@\"\n")
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "BENCH_LISTEN_HOST": "127.0.0.1", "BENCH_LISTEN_PORT": str(port),
        "BENCH_TLS_CERT": str(certs["server.pem"]), "BENCH_TLS_KEY": str(certs["server.key"]),
        "BENCH_CLIENT_CA": str(certs["ca.pem"]), "BENCH_CLIENT_CN": CLIENT_CN,
        "BENCH_APP_SECRET": secret, "BENCH_TARGET_URL": f"http://127.0.0.1:{sink_port}/sink",
        "BENCH_WEBHOOK_PATH": PATH, "BENCH_WORKDIR": str(folder),
        "WABA_BENCH_PYTHON": str(wrapper), "PYTHONHASHSEED": "0",
        # No polling while counting: fresh notifications are offered to the dispatcher, and
        # a claim every 0.1 s (the default) would, at callgrind's pace, cost more than the
        # changes measured, in proportion to how long the run takes, that is to the load.
        "WABA_BENCH_POLL_INTERVAL_S": "3600",
    }
    if installed:
        env["WABA_BENCH_INSTALLED"] = "1"
    store: Path | tuple[object, str] = folder / "outbox.sqlite3"
    if args.pg is not None:
        database = f"run_{folder.name.replace('-', '_').lower()}"
        args.pg.psql(f"CREATE DATABASE {database}")
        env["WABA_BENCH_OUTBOX_URL"] = args.pg.socket_url(database)
        store = (args.pg, database)
    if args.kind != "http":
        env["BENCH_TARGET_URL"], env["WABA_BENCH_TARGET_TOML"] = args.target
    logfile = folder / "gateway.log"
    with logfile.open("wb") as output:
        gateway = subprocess.Popen(["bash", str(adapter)], env=env, stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    clients: list[Client] = []
    try:
        wait_port(sink_port, sink, 30, logfile)
        wait_port(port, gateway, args.start_timeout, logfile)
        close = "Connection: close\r\n" if args.new else ""
        request = (f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                   f"\r\nX-Hub-Signature-256: {signature}\r\nContent-Length: {len(body)}\r\n"
                   f"{close}\r\n").encode() + body
        clients = [Client(port, certs, request, args.new) for _ in range(args.concurrency)]
        posted = 0
        for phase in ("warmup", "count"):
            total = getattr(args, phase)
            shares = [total // len(clients) + (i < total % len(clients))
                      for i in range(len(clients))]
            with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
                answered = list(pool.map(_post_many, clients, shares))
            for status in answered:
                if status != 200:
                    raise SystemExit(f"answered {status}:\n{logfile.read_text()[-3000:]}")
            posted += total
            if args.kind == "http":
                until_delivered(bench, sink_port, posted)
            if args.kind != "http" or args.pg is not None:
                until_recorded(store, posted)
            time.sleep(args.settle_s)  # the outcomes' lazy commit
            control("-z" if phase == "warmup" else "-d", gateway.pid)
    finally:
        for client in clients:
            client.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(gateway.pid, signal.SIGTERM)
        try:
            gateway.wait(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(gateway.pid, signal.SIGKILL)
            gateway.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sink.pid, signal.SIGTERM)
        sink.wait()
    total = 0
    for dump in folder.glob("callgrind.out.*"):  # the dump asked for, not the one at exit
        match = re.search(r"^(?:summary|totals): (\d+)", dump.read_text(errors="replace"), re.M)
        if match:
            total += int(match.group(1))
    if not total:
        raise SystemExit(f"no callgrind count in {folder}:\n{logfile.read_text()[-3000:]}")
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return total


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revs", nargs="+", help="revisions ('.': this checkout as it is)")
    parser.add_argument("--shared", type=Path, default=os.environ.get("WABA_BENCH_SHARED"),
                        help="the shared harness's folder, for sink.py and payload.json")
    parser.add_argument("--count", type=int, default=2000, help="requests measured")
    parser.add_argument("--warmup", type=int, default=200, help="requests before counting")
    parser.add_argument("--rounds", type=int, default=1, help="runs per revision")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="connections posting at once (1: one request at a time; 32: as"
                        " ab -c 32, requests grouped as under load)")
    parser.add_argument("--new", action="store_true",
                        help="a new connection (a full TLS handshake) for each request")
    parser.add_argument("--kind", choices=("http", "redis", "nats"), default="http",
                        help="the target's kind (redis, nats: install REV[redis,nats])")
    parser.add_argument("--extras", default="", help="install REV[EXTRAS]")
    parser.add_argument("--outbox", choices=("sqlite", "postgres"), default="sqlite",
                        help="postgres: a throw-away local server, a database per run"
                        " (install REV[postgres])")
    parser.add_argument("--workdir", type=Path, help="keep builds here and reuse them")
    parser.add_argument("--start-timeout", type=float, default=600)
    parser.add_argument("--settle-s", type=float, default=2.0)
    parser.add_argument("--keep", action="store_true", help="keep each run's folder")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.shared is None or not (Path(args.shared) / "sink.py").is_file():
        parser.error("--shared DIR (or $WABA_BENCH_SHARED): the folder with sink.py")
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        parser.error("valgrind is not installed (Debian: apt-get install valgrind)")
    args.sink = str(Path(args.shared) / "sink.py")
    args.payload = str(Path(args.shared) / "payload.json")
    # The sibling scripts, imported as kinds.py and ordering.py import them (this folder is
    # first on sys.path when the script runs).
    import compare

    import bench
    work = args.workdir or Path(tempfile.mkdtemp(prefix="waba-instructions-"))
    work.mkdir(parents=True, exist_ok=True)
    builds: list[tuple[str, Path, Path, bool]] = []
    for rev in args.revs:
        if rev == ".":
            builds.append((".", Path(sys.executable), HERE / "candidate.sh", False))
        else:
            made = compare.build(rev, work, args.extras)
            builds.append((f"{rev} ({made.commit[:10]})", made.python, made.adapter, True))
    figures: dict[str, list[float]] = {name: [] for name, *_ in builds}
    args.pg = None
    if args.outbox == "postgres":
        sys.path.append(str(HERE.parent / "tests" / "support"))
        from pgserver import init_server

        args.pg = init_server()
    target = broker(args.kind)
    args.target = target.__enter__()
    try:
        for round_no in range(1, args.rounds + 1):
            order = builds if round_no % 2 else list(reversed(builds))
            for name, python, adapter, installed in order:
                total = one_run(args, bench, python, adapter, installed, work)
                figures[name].append(total / args.count)
                log(f"round {round_no}: {name}: {total / args.count:,.0f} instructions per "
                    f"request ({total:,} in {args.count})")
    finally:
        target.__exit__(None, None, None)
        if args.pg is not None:
            with contextlib.suppress(subprocess.CalledProcessError):
                args.pg.stop("immediate")
            shutil.rmtree(args.pg.folder, ignore_errors=True)
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    over = "a new mTLS connection each" if args.new else "kept-alive mTLS connections"
    at_once = "one at a time" if args.concurrency == 1 else f"{args.concurrency} at a time"
    print(f"instructions per request (callgrind; {args.count} requests over {over}, {at_once}"
          f", each delivered to a {args.kind} target, {args.outbox} outbox; median "
          f"[min..max] of {args.rounds})")
    first = statistics.median(figures[builds[0][0]])
    for name, values in figures.items():
        median = statistics.median(values)
        print(f"{name:<28} {median:>12,.0f} [{min(values):,.0f}..{max(values):,.0f}]"
              f"  {median / first:.3f}x")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
