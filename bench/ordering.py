#!/usr/bin/env python3
"""Delivered per second with ``order = "conversation"`` against ``order = "none"``, in one run.

Rule: the same real gateway (started through ``candidate.sh``, pinned as ``bench.py`` pins it)
and the shared benchmark's ``sink.py``; only the target's ``order`` differs. The load is
``--count`` notifications spread over ``--conversations`` users (the shared payload with its
user's phone number and a business-scoped user id set per user, and a unique wamid), posted over
mTLS by an aiohttp client at ``--concurrency``: ``ab`` posts one body, which would be one
conversation. Two measurements per gateway:

  live    the target up while the notifications arrive: delivered/s from the first request
          to the last delivery (the client is part of the figure, the same for every mode)
  drain   the notifications stored with the target down, then the target up: delivered/s of
          the dispatcher alone. Retry waits of 10 to 50 ms: with order, a conversation's next
          deliveries wait for its first one's retry, and with bench.py's waits (up to 1 s) the
          figure would measure the backoff rather than the dispatcher. Timed from the sink's
          first request to its last (``delivered_per_s``); ``delivered_per_s_with_start``
          also counts the wait for the target's breaker to close after the sink comes up
          (``sink_up_to_first_s``), which swung the earlier figure by up to a fifth

Every round runs both modes (alternating which goes first) and, with ``--ref``, the shared
benchmark's plain aiohttp receiver (``ref_gateway.py``, forwarding before it answers) under the
same client: the machine's noise shows in its spread across rounds. A round stores both modes'
backlogs first (each gateway stopped, SIGSTOP, once its backlog is stored, and continued when
its drain starts) and then drains them back to back, so that its two drains are seconds apart;
the summary gives the ratio of the medians and the median of the rounds' own ratios.

What each gateway run delivered is counted by delivery id (``idsink.py``, not the shared sink's
count of requests): ``delivered`` is the distinct ids the target received, ``duplicates`` the
requests beyond those (a resend, which at-least-once allows: ``unrecorded`` and ``unrenewed``
count the gateway's log lines that explain one), ``states`` the outbox's rows by state once
none is pending. A run is ``drained`` only when nothing is pending, nothing is dead, and the
target received every notification's delivery. The target's ``attempts`` are raised (``--attempts``)
so that no delivery dies while the target is down for the drain: with the gateway's 12, at
waits of 10 to 50 ms, a probe may spend a delivery's attempts before the target is back.

With ``--outbox postgres`` every gateway runs on a throw-away PostgreSQL server (as ``bench.py
--outbox postgres``, one new database per gateway), and each ordered drain prints the plan of
the ordered claim (``EXPLAIN``) on its full backlog: its ``NOT EXISTS`` is an index scan.

Usage: ordering.py --sink PATH/TO/sink.py [--ref PATH/TO/ref_gateway.py] [--rounds 3]
                   [--outbox sqlite|postgres] [--phases live,drain]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import os
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
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import counts

from bench import (
    CLK_TCK,
    Bench,
    Proc,
    cpu_ticks,
    free_port,
    log,
    pinned,
    sink_get,
    thread_cpu,
    wait_drained,
    wait_listening,
)
from bench import (
    parse_args as bench_args,
)

MODES = {"none": 'order = "none"', "conversation": 'order = "conversation"'}
TINY_WAITS = "wait_initial_s = 0.01\nwait_max_s = 0.05"


def bodies(payload: bytes, count: int, conversations: int) -> list[bytes]:
    """``count`` notifications, notification ``n`` from user ``n % conversations``."""
    template: Any = json.loads(payload)
    out = []
    for n in range(count):
        value = template["entry"][0]["changes"][0]["value"]
        user = n % conversations
        phone = f"1650{user:07d}"
        for contact in value.get("contacts", []):
            contact["wa_id"], contact["user_id"] = phone, f"US.{user}"
        for message in value.get("messages", []):
            message["from"], message["from_user_id"] = phone, f"US.{user}"
            message["id"] = f"wamid.bench{n:09d}"
        out.append(json.dumps(template, separators=(",", ":")).encode())
    return out


async def post_all(url: str, certs: dict[str, Path], secret: bytes, payloads: list[bytes],
                   concurrency: int) -> float:
    """POST every payload, signed, over ``concurrency`` kept-alive mTLS connections; the
    seconds it took. Each connection sends its share in order."""
    context = ssl.create_default_context(cafile=str(certs["ca.pem"]))
    context.load_cert_chain(str(certs["client.pem"]))
    connector = aiohttp.TCPConnector(limit=concurrency, ssl=context)
    started = time.monotonic()
    async with aiohttp.ClientSession(connector=connector) as session:

        async def lane(share: list[bytes]) -> None:
            for body in share:
                signature = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
                headers = {"Content-Type": "application/json", "X-Hub-Signature-256": signature}
                async with session.post(url, data=body, headers=headers) as answer:
                    await answer.read()
                    if answer.status != 200:
                        raise SystemExit(f"{url}: HTTP {answer.status}")

        await asyncio.gather(*(lane(payloads[i::concurrency]) for i in range(concurrency)))
    return time.monotonic() - started


def wait_forwarded(port: int, count: int, limit_s: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        if sink_get(port, "/__stats")["requests"] >= count:
            return time.monotonic() - started
        time.sleep(0.02)
    return None


def watch_sink(port: int, count: int, limit_s: float) -> tuple[float, float | None]:
    """When the id sink (up since just now) received its first request and its ``count``-th
    distinct delivery (``None``: not within ``limit_s``), polled every 5 ms. Distinct ids, not
    requests: a delivery sent twice would otherwise end the steady rate's span before the last
    delivery came, and raise the rate."""
    started = time.monotonic()
    first = None
    while time.monotonic() - started < limit_s:
        seen = sink_get(port, "/__stats")["distinct"]
        now = time.monotonic()
        if seen and first is None:
            first = now
        if seen >= count:
            return first or now, now
        time.sleep(0.005)
    return first or started, None


class Stored(NamedTuple):
    """A gateway with its backlog stored and its target down, waiting for its drain."""

    mode: str
    round_: int
    gateway: Any
    held: socket.socket  # the target's port, bound and not listening until the drain
    counts_file: Path | None
    ticks: int  # the gateway's CPU ticks once stored
    at: float  # time.monotonic() once stored


class Ordering:
    def __init__(self, bench: Bench, args: argparse.Namespace) -> None:
        self.bench, self.args = bench, args
        self.secret = bench.env_base["BENCH_APP_SECRET"].encode()
        self.payloads = bodies(bench.payload_path.read_bytes(), args.count, args.conversations)
        self.rows: list[dict[str, Any]] = []
        # Enough attempts that no delivery dies while the target is down for the drain (the
        # gateway's 12 at waits of 10 to 50 ms end within a second of probes): a dead letter
        # is not a delivery, and the figures are of deliveries.
        self.attempts = f"attempts = {args.attempts}"

    def live(self, mode: str, round_: int) -> dict[str, Any]:
        b, a = self.bench, self.args
        sink_port = free_port()
        sink = self.id_sink(sink_port)
        gateway = b.gateway(f"gw-live-{mode}-{round_}", target_port=sink_port,
                            cpus=b.args.gw_cpus, target_toml=f"{MODES[mode]}\n{self.attempts}")
        posted = asyncio.run(post_all(gateway.url, b.certs, self.secret, self.payloads,
                                      a.concurrency))
        drained = wait_drained(gateway, 300)
        seen = sink_get(sink_port, "/__stats")
        outbox = gateway.outbox_stats()
        b.stop_gateway(gateway)
        sink.stop()
        b.procs.remove(sink)
        total = posted + (drained or 0)
        return self.counted("live", mode, round_, seen, outbox, drained is not None, gateway) | {
            "acked_per_s": round(len(self.payloads) / posted, 1),
            "delivered_per_s": round(seen["distinct"] / total, 1)}

    def store(self, mode: str, round_: int) -> Stored:
        """A gateway in ``mode`` with the notifications stored, its target down."""
        b, a = self.bench, self.args
        # The target's port stays this bench's while the target is down: bound, not listening
        # (connections to it are refused, as to a target that is down), so that no other
        # process on a shared machine (a test server on a port of the ephemeral range) can
        # listen there meanwhile and take deliveries the sink then never sees.
        held = socket.socket()
        held.bind(("127.0.0.1", 0))
        counts_file = self.counting(f"gw-drain-{mode}-{round_}")
        gateway = b.gateway(f"gw-drain-{mode}-{round_}", target_port=held.getsockname()[1],
                            cpus=b.args.gw_cpus,
                            target_toml=f"{MODES[mode]}\n{TINY_WAITS}\n{self.attempts}")
        asyncio.run(post_all(gateway.url, b.certs, self.secret, self.payloads, a.concurrency))
        if b.pg is not None and mode == "conversation":
            log(claim_plan(b.pg, gateway.database))
        if self.args.keep_outbox:  # for bench/drain.py --from-outbox
            kept = Path(self.args.keep_outbox) / f"{mode}-{round_}"
            kept.mkdir(parents=True, exist_ok=True)
            for suffix in ("", "-wal"):
                with contextlib.suppress(FileNotFoundError):
                    shutil.copy(f"{gateway.outbox}{suffix}", kept / f"outbox.sqlite3{suffix}")
        # Stopped until its drain: on the same core as the other mode's drain, its breaker's
        # probes of the target that is down would take a share of that drain's CPU.
        os.kill(gateway.serving_pid(), signal.SIGSTOP)
        return Stored(mode, round_, gateway, held, counts_file, cpu_ticks(gateway.proc.pid),
                      time.monotonic())

    def drain(self, stored: Stored) -> dict[str, Any]:
        b = self.bench
        mode, round_, gateway, held, counts_file = (
            stored.mode, stored.round_, stored.gateway, stored.held, stored.counts_file)
        sink_port = int(held.getsockname()[1])
        # How long the gateway waited, stopped, for the other mode's drain, and the CPU it
        # spent meanwhile (none, unless something else ran in its process group).
        waited_s = time.monotonic() - stored.at
        waiting_cpu_ms = (cpu_ticks(gateway.proc.pid) - stored.ticks) * 1000 / CLK_TCK
        os.kill(gateway.serving_pid(), signal.SIGCONT)
        before = backlog_at_start(b, gateway)
        profiler = self.profile(gateway, f"drain-{mode}-{round_}")
        held.close()
        sink = self.id_sink(sink_port)
        load_before = os.getloadavg()[0]
        if counts_file is not None:
            self.count_now(gateway, counts_file)
        threads, io = thread_times(gateway.serving_pid()), counts.io_counts(gateway.serving_pid())
        started, ticks = time.monotonic(), cpu_ticks(gateway.proc.pid)
        first, last = watch_sink(sink_port, len(self.payloads), 300)
        # The gateway's CPU from the sink's first request to its last: with the drain time, the
        # share of its (pinned) CPU it used. Near 1: the drain is its CPU's speed; well below:
        # it waited (for the target, for retries, for commits) or the CPU was someone else's.
        cpu_first_last = cpu_ticks(gateway.proc.pid)
        drained = wait_drained(gateway, 300)
        took = time.monotonic() - started
        cpu_s = (cpu_ticks(gateway.proc.pid) - ticks) / CLK_TCK
        threads = {
            f"{name} {kind}": round(1e6 * (spent - threads.get((name, kind), 0)) / CLK_TCK
                                    / len(self.payloads), 1)
            for (name, kind), spent in thread_times(gateway.serving_pid()).items()}
        io = {key: round((value - io.get(key, 0)) / len(self.payloads), 2)
              for key, value in counts.io_counts(gateway.serving_pid()).items()}
        if profiler is not None:  # py-spy writes its profile when interrupted
            profiler.send_signal(signal.SIGINT)
            profiler.wait(60)
        counted = {}
        if counts_file is not None:
            found = counts.difference(*self.count_now(gateway, counts_file)[-2:])
            counted = {"counts": found,
                       "counts_per_delivery": counts.per_delivery(found, len(self.payloads))}
        seen = sink_get(sink_port, "/__stats")
        outbox = gateway.outbox_stats()
        b.stop_gateway(gateway)
        sink.stop()
        b.procs.remove(sink)
        delivered = seen["distinct"]
        # From the sink's first request to its last: the dispatcher's own rate, without the
        # wait for the target's breaker to close (a pause, then a probe on the poll interval:
        # up to ~0.15 s, a fifth of a 10,000 delivery drain) nor the poll for nothing pending.
        steady = (delivered - 1) / max(last - first, 1e-6) if last is not None else 0.0
        return self.counted("drain", mode, round_, seen, outbox, drained is not None, gateway) | {
            "delivered_per_s": round(steady, 1),
            "sink_up_to_first_s": round(first - started, 3),
            "delivered_per_s_with_start": round(delivered / took, 1),
            # The gateway's CPU per delivery while draining: it moves least with the load.
            "cpu_us_per_delivery": round(1e6 * cpu_s / max(delivered, 1), 1),
            # What could make one round differ from the next (see backlog_at_start).
            "cpu_share_first_to_last": round(
                (cpu_first_last - ticks) / CLK_TCK / max((last or first) - started, 1e-6), 2),
            "load_avg_at_start": round(load_before, 2),
            "load_avg_at_end": round(os.getloadavg()[0], 2),
            # The same per thread, user and system: which side of the process spends it.
            "cpu_us_per_delivery_threads": threads,
            # Bytes and system calls of reads and writes (files and sockets) per delivery.
            "io_per_delivery": io,
            "stored_to_drain_s": round(waited_s, 1),
            "cpu_ms_while_stored": round(waiting_cpu_ms, 1),
            **before, **counted}

    def profile(self, gateway: Any, name: str) -> subprocess.Popen[bytes] | None:
        """With ``--py-spy DIR``: py-spy records the gateway into DIR/NAME.txt (raw, one stack
        per line with its count) until interrupted; ``--py-spy-native``: with C frames, which
        pauses the gateway at each sample (slower: compare profiles, not rates)."""
        if not self.args.py_spy:
            return None
        out = Path(self.args.py_spy) / f"{name}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        argv = ["py-spy", "record", "--pid", str(gateway.serving_pid()), "--rate", "250",
                "--format", "raw", "--threads", "--output", str(out),
                *(["--native"] if self.args.py_spy_native else ["--nonblocking"])]
        proc = subprocess.Popen(pinned(argv, self.bench.args.load_cpus),  # noqa: S603
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)  # attached before the sink comes up
        return proc

    def counting(self, name: str) -> Path | None:
        """With ``--counts``: the next gateway counts (``counts.py``) into this file."""
        env = self.bench.env_base
        if not self.args.counts:
            return None
        path = self.bench.tmp / f"{name}.counts"
        here = Path(__file__).resolve().parent / "counting"
        env["PYTHONPATH"] = os.pathsep.join(
            [str(here), *filter(None, [os.environ.get("PYTHONPATH")])])
        env["WABA_BENCH_COUNTS"] = str(path)
        return path

    def count_now(self, gateway: Any, path: Path) -> list[dict[str, int]]:
        """Have the gateway append its counts to ``path``; every snapshot there so far."""
        lines = path.read_text().splitlines() if path.exists() else []
        os.kill(gateway.serving_pid(), signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            now = path.read_text().splitlines() if path.exists() else []
            if len(now) > len(lines) and now[-1].endswith("}"):
                return [json.loads(line) for line in now]
            time.sleep(0.01)
        raise SystemExit(f"{gateway.proc.name}: no counts within 10 s")

    def id_sink(self, port: int) -> Proc:
        """The sink that counts deliveries by id (idsink.py), where sink.py counts requests."""
        b = self.bench
        argv = [sys.executable, str(Path(__file__).with_name("idsink.py")), "--port", str(port)]
        proc = Proc(f"idsink-{port}", pinned(argv, b.args.load_cpus), b.tmp, dict(os.environ))
        b.procs.append(proc)
        wait_listening(port, proc, 10)
        return proc

    def counted(self, phase: str, mode: str, round_: int, seen: dict[str, int],
                outbox: dict[str, Any], empty: bool, gateway: Any) -> dict[str, Any]:
        """What the sink and the outbox say once no delivery is pending (``empty``): every
        notification's delivery at the sink once (``distinct``), the requests beyond that
        (``duplicates``: a resend, which at-least-once allows, counted apart), and the outbox's
        rows by state. Drained only when nothing is pending, nothing is dead, and the sink
        saw every delivery the outbox calls delivered."""
        count = len(self.payloads)
        states = outbox["states"]
        delivered = int(states.get("delivered", 0))
        drained = (empty and delivered == count and seen["distinct"] == count
                   and not states.get("dead"))
        # What sends a delivery again, as the gateway logged it (at-least-once: see README,
        # "Conversations in order" and "Several hosts"): outcomes it could not record, and
        # leases it could not renew.
        logged = gateway.proc.log_path.read_text(errors="replace")
        said = [line for line in logged.splitlines() if "WARNING" in line or "ERROR" in line]
        row = {"mode": mode, "round": round_, "phase": phase, "delivered": seen["distinct"],
                "duplicates": seen["duplicates"], "requests": seen["requests"],
                # Where the target waited for the gateway (idsink.py): the longest gap between
                # two first arrivals, and every one over 15 ms.
                "longest_pause_ms": seen.get("longest_pause_ms"),
                "pauses_ms": seen.get("pauses_ms"),
                # Recorded delivered, never seen by the sink: answered by someone else.
                "elsewhere": max(delivered - seen["distinct"], 0),
                "states": states, "drained": drained,
                # Attempts the outbox recorded beyond one per delivery: retries (a refused
                # connection while the target was down, a batch that timed out).
                "retries": int(outbox["attempts"]) - sum(int(v) for v in states.values()),
                "unrecorded": logged.count("could not record"),
                "unrenewed": logged.count("could not renew")}
        if seen["duplicates"] or not drained:  # the gateway's own account, first lines
            row["said"] = said[:20]
        return row

    def reference(self, round_: int) -> dict[str, Any]:
        """The plain receiver: forwards each request before answering it."""
        b, a = self.bench, self.args
        sink_port, port = free_port(), free_port()
        sink = b.sink(sink_port, b.args.load_cpus)
        env = dict(b.env_base, BENCH_LISTEN_PORT=str(port),
                   BENCH_TARGET_URL=f"http://127.0.0.1:{sink_port}/sink")
        ref = Proc(f"ref-{round_}", pinned([sys.executable, a.ref], b.args.gw_cpus), b.tmp, env)
        b.procs.append(ref)
        wait_listening(port, ref, 30)
        url = f"https://127.0.0.1:{port}{b.path}"
        posted = asyncio.run(post_all(url, b.certs, self.secret, self.payloads, a.concurrency))
        forwarded = wait_forwarded(sink_port, len(self.payloads), 60)
        delivered = sink_get(sink_port, "/__stats")["requests"]
        for proc in (ref, sink):
            proc.stop()
            b.procs.remove(proc)
        return {"mode": "ref-1p", "round": round_, "phase": "live",
                "delivered_per_s": round(delivered / (posted + (forwarded or 0)), 1)}

    def run(self) -> None:
        phases = self.args.phases.split(",")
        for round_ in range(self.args.rounds):
            modes = list(MODES) if round_ % 2 == 0 else list(reversed(MODES))
            if self.args.ref:
                self.record(self.reference(round_))
            for mode in modes if "live" in phases else ():
                self.record(self.live(mode, round_))
            if "drain" in phases:
                # Both modes' backlogs first, then their drains back to back: the two drains
                # of a round are seconds apart rather than the half minute it takes to start a
                # gateway and store a backlog, and the speed of a shared machine, which moves
                # by a third or more within a minute, moves less between them.
                for stored in [self.store(mode, round_) for mode in modes]:
                    self.record(self.drain(stored))

    def record(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        log(json.dumps(row))

    def summary(self) -> dict[str, Any]:
        """Median and min..max of delivered/s per phase and mode, and the ratio of medians."""
        table: dict[str, Any] = {}
        for phase in ("live", "drain"):
            for mode in ("ref-1p", *MODES):
                figures = [r["delivered_per_s"] for r in self.rows
                           if r["phase"] == phase and r["mode"] == mode]
                if figures:
                    table[f"{phase} {mode}"] = {"median": statistics.median(figures),
                                                "min": min(figures), "max": max(figures)}
            none, ordered = table.get(f"{phase} none"), table.get(f"{phase} conversation")
            if none and ordered:
                table[f"{phase} ratio"] = round(ordered["median"] / none["median"], 3)
            for mode in MODES:
                cpu = [r["cpu_us_per_delivery"] for r in self.rows
                       if r["phase"] == phase and r["mode"] == mode and "cpu_us_per_delivery" in r]
                if cpu:
                    table[f"{phase} {mode} cpu_us_per_delivery"] = {
                        "median": statistics.median(cpu), "min": min(cpu), "max": max(cpu)}
        # Each round's drain ratio beside what could explain it: the load, the share of its CPU
        # the gateway used, the write-ahead log and the retries the backlog started with.
        rounds = sorted({r["round"] for r in self.rows if r["phase"] == "drain"})
        per_round = []
        for round_ in rounds:
            runs = {r["mode"]: r for r in self.rows
                    if r["phase"] == "drain" and r["round"] == round_}
            if "none" in runs and "conversation" in runs:
                ratio = runs["conversation"]["delivered_per_s"] / max(
                    runs["none"]["delivered_per_s"], 1e-9)
                line = {"round": round_, "ratio": round(ratio, 3)}
                for mode, run in runs.items():
                    line[mode] = {key: run.get(key) for key in (
                        "delivered_per_s", "cpu_us_per_delivery", "cpu_share_first_to_last",
                        "load_avg_at_start", "sink_up_to_first_s", "wal_bytes_at_start",
                        "tried_while_down", "retry_waiting_at_start", "retries")}
                per_round.append(line)
        if per_round:
            # Each round's two drains ran back to back, so its own ratio shares the machine's
            # speed at that moment; their median moves less with it than the ratio of medians.
            table["drain ratio, median of the rounds'"] = round(
                statistics.median(line["ratio"] for line in per_round), 3)
            table["drain rounds"] = per_round
        # Truth before speed: a figure from a run that lost or doubled deliveries says so.
        gateway_rows = [r for r in self.rows if "drained" in r]
        table["runs not drained"] = [f"{r['phase']} {r['mode']} {r['round']}"
                                     for r in gateway_rows if not r["drained"]]
        table["duplicates"] = sum(r["duplicates"] for r in gateway_rows)
        return table


def thread_times(pid: int) -> dict[tuple[str, str], int]:
    """CPU ticks of ``pid``'s main thread (the event loop) and of its others (the outbox's
    writer, mostly), user and system apart."""
    found: dict[tuple[str, str], int] = {}
    for tid, ticks in thread_cpu(pid).items():
        name = "main" if tid == pid else "others"
        for kind, spent in zip(("user", "sys"), ticks, strict=True):
            found[(name, kind)] = found.get((name, kind), 0) + spent
    return found


def backlog_at_start(bench: Bench, gateway: Any) -> dict[str, Any]:
    """The stored backlog as the target comes up: the outbox's write-ahead log (SQLite: how
    much a claim may read through it before a checkpoint), how many pending deliveries were
    already tried while the target was down (the breaker's probes and the first sends: each
    one failed, so it and, with order, its conversation wait for a retry of 10 to 50 ms), and
    how many of those are still waiting for that retry."""
    now = time.time()
    query = ("SELECT COUNT(*), COALESCE(SUM(attempts > 0), 0),"  # noqa: S608 (constants)
             f" COALESCE(SUM(next_attempt_at > {now!r}), 0) FROM {{table}}"
             " WHERE state = 'pending'")
    if bench.pg is not None:
        cells = bench.pg.psql(query.format(table="waba_gateway.deliveries")
                              .replace("attempts > 0", "(attempts > 0)::int")
                              .replace(f"next_attempt_at > {now!r}",
                                       f"(next_attempt_at > {now!r})::int"),
                              gateway.database).split("|")
        wal = None
    else:
        with contextlib.closing(sqlite3.connect(gateway.outbox, timeout=30)) as conn:
            cells = list(conn.execute(query.format(table="deliveries")).fetchone())
        wal_path = gateway.outbox.with_name(gateway.outbox.name + "-wal")
        wal = wal_path.stat().st_size if wal_path.exists() else 0
    pending, tried, waiting = (int(cell) for cell in cells)
    return {"pending_at_start": pending, "tried_while_down": tried,
            "retry_waiting_at_start": waiting, "wal_bytes_at_start": wal}


def claim_plan(pg: Any, database: str) -> str:
    """The plan PostgreSQL makes for the ordered claim on this database as it stands (the
    statement's placeholders filled with the values a claim passes)."""
    from claimplan import ordered_claim  # tests/support; only with --outbox postgres

    statement = ordered_claim("sink", time.time(), 256)
    pg.psql("ANALYZE", database=database)
    plan = pg.psql(f"EXPLAIN {statement}", database=database)
    # The part for targets with order = "conversation" (mode 1), up to the next one's.
    part = plan.split("Filter: (mode = 1)", 1)[-1].split("Filter: (mode = 2)", 1)[0]
    uses = "deliveries_order" in part.split("SubPlan", 1)[-1]
    return f"ordered claim plan (NOT EXISTS by the index: {uses}):\n{plan}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sink", default=os.environ.get("WABA_BENCH_SINK"))
    parser.add_argument("--ref", help="the shared benchmark's ref_gateway.py (the plain receiver)")
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-c", "--concurrency", type=int, default=32)
    parser.add_argument("--payload", help="notification body (default: bench.py's)")
    parser.add_argument("--json", help="write every row and the summary here")
    parser.add_argument("--outbox", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--phases", default="live,drain", help="live, drain or both")
    parser.add_argument("--counts", action="store_true",
                        help="count what each drain does per delivery (counts.py) in its row")
    parser.add_argument("--keep-outbox", help="a folder: a copy of each drain's stored outbox"
                        " there (MODE-ROUND/outbox.sqlite3), for bench/drain.py --from-outbox")
    parser.add_argument("--py-spy", help="a folder: py-spy's raw profile of each drain there")
    parser.add_argument("--py-spy-native", action="store_true",
                        help="with --py-spy: native frames too (pauses the gateway per sample)")
    parser.add_argument("--attempts", type=int, default=1_000_000,
                        help="the target's attempts (12: the gateway's default)")
    args = parser.parse_args(argv)
    base = bench_args(["--sink", args.sink or "", "--phases", "e2e", "--outbox", args.outbox,
                       *(["--payload", args.payload] if args.payload else [])])
    tmp = Path(tempfile.mkdtemp(prefix="waba-bench-order-"))
    bench = Bench(base, tmp)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    ordering = Ordering(bench, args)
    try:
        ordering.run()
    except KeyboardInterrupt:
        log("interrupted")
    finally:
        bench.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    summary = ordering.summary()
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": ordering.rows, "summary": summary},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
