#!/usr/bin/env python3
"""Compare two revisions of the gateway through the shared harness, interleaved.

Rule: one machine, several rounds, both revisions in every round and the anchors (the plain
aiohttp receiver ``ref-1p``, and nginx for new connections) in every run, so a ratio is only ever
taken between figures measured minutes apart. Each revision is built from git (``git archive``)
into a fresh virtual environment with the README's plain install (``pip install .``, or with
``--extras``), and served through that revision's own ``bench/candidate.sh`` (this one's when it
has none), copied away from its source tree so that the installed package is what runs.

Rounds alternate the order (A B, B A, ...). For each run and mode the figures kept are the
candidate's rate over its anchor's (keep-alive: ``ref-1p``; new connections: ``nginx``), the
gateway's CPU per request (its process tree's CPU time over the requests ``ab`` completed), and
``fwd`` (requests the sink received over requests acknowledged). The summary prints, per mode and
revision, the median and [min..max] over the rounds, and B against A: the median and range of
the per-round quotients (B's figure over A's in the same round).

Usage:
  bench/compare.py REV_A REV_B --shared DIR [--rounds 3] [--modes ka,new] [--duration 8]
  (DIR: the shared harness's folder, with bench.py, sink.py and payload.json; or
  $WABA_BENCH_SHARED.) See bench/README.md, "Comparing two revisions".
"""

# ruff: noqa: S603, S607
# S603/S607: this script's job is to run git, pip and the harness as subprocesses, with argument
# lists built here (never a shell string), found on PATH like any command line tool.

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ANCHOR = {"ka": "ref-1p", "new": "nginx"}  # what each mode's ratio is taken against


def log(*parts: object) -> None:
    print(time.strftime("%H:%M:%S"), *parts, file=sys.stderr, flush=True)


@dataclass
class Build:
    """One revision, unpacked and installed in a virtual environment of its own."""

    rev: str  # as given
    commit: str
    python: Path
    adapter: Path  # its candidate.sh, in a folder with no ``gateway`` package beside it
    runs: list[dict[str, Any]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # --env-b: for B's runs alone


def git(*argv: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *argv], capture_output=True, text=True,
                          check=True).stdout.strip()


def build(rev: str, work: Path, extras: str, own_adapter: bool = False) -> Build:
    """Unpack ``rev`` with git archive and install it in a fresh venv (plain ``pip install``)."""
    try:
        commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    except subprocess.CalledProcessError:
        raise SystemExit(f"error: {rev!r} is not a revision of this repository") from None
    short = commit[:10]
    # One venv per revision and set of extras: a kept workdir must not serve a plain install
    # where the extras were asked for (or the reverse).
    tag = short + "".join(f"-{name}" for name in sorted(filter(None, extras.split(","))))
    source, venv = work / f"src-{short}", work / f"venv-{tag}"
    if not source.exists():
        source.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    python = venv / "bin" / "python"
    if not python.exists():
        log(f"{rev} ({short}): python -m venv, pip install .{f'[{extras}]' if extras else ''}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        target = f"{source}[{extras}]" if extras else str(source)
        done = subprocess.run([str(python), "-m", "pip", "install", "-q", target], cwd=work,
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"error: pip install {target} failed:\n{done.stderr[-2000:]}")
    adapter = work / f"adapter-{short}" / "bench" / "candidate.sh"
    adapter.parent.mkdir(parents=True, exist_ok=True)
    own = source / "bench" / "candidate.sh"
    # This checkout's adapter serves both revisions by default: the same configuration (and the
    # admin port that the per-run readings need) on both sides of a comparison.
    shutil.copyfile(own if own_adapter and own.exists() else HERE / "candidate.sh", adapter)
    return Build(rev, commit, python, adapter)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def run_harness(args: argparse.Namespace, item: Build, round_no: int, out: Path) -> dict[str, Any]:
    """One run of the shared harness: the anchors and this revision, every mode, one round."""
    modes = args.modes.split(",")
    targets = ["ref-1p"] + (["nginx"] if "new" in modes else []) + ["candidate"]
    candidate = (f"WABA_BENCH_PYTHON={shlex.quote(str(item.python))} "
                 f"exec bash {shlex.quote(str(item.adapter))}")
    argv = [sys.executable, str(HERE / "harness.py"), str(args.shared / "bench.py"),
            "--targets", ",".join(targets), "--modes", args.modes, "--rounds", "1",
            "--duration", str(args.duration), "--candidate", candidate, "--json", str(out),
            *args.harness_args]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if args.outbox_url:
        env["WABA_BENCH_OUTBOX_URL"] = args.outbox_url
    env["WABA_BENCH_ADMIN_PORT"] = str(free_port())  # the writer's commits, per run
    env.update(item.env)
    log(f"round {round_no}: {item.rev} ({item.commit[:10]})")
    done = subprocess.run(argv, cwd=args.shared, env=env, capture_output=True, text=True,
                          timeout=args.run_timeout, check=False)
    if done.returncode != 0 or not out.exists():
        log(f"round {round_no}: {item.rev}: harness failed ({done.returncode}):\n"
            + "\n".join((done.stderr or done.stdout).splitlines()[-15:]))
        return {}
    return figures(json.loads(out.read_text()), modes)


def figures(result: dict[str, Any], modes: Sequence[str]) -> dict[str, Any]:
    """Per mode: the candidate's ratio to its anchor, CPU per request (us), fwd, raw rates."""
    by: dict[tuple[str, str], dict[str, Any]] = {
        (run["target"], run["mode"]): run for run in result.get("runs", [])}
    found: dict[str, Any] = {}
    for mode in modes:
        cand, anchor = by.get(("candidate", mode)), by.get((ANCHOR[mode], mode))
        if not cand or not anchor or not anchor["rps"]:
            continue
        if not cand["rps"]:
            # Nothing completed (ab timed out, say): a rate of 0, not a missing round.
            found[mode] = {"ratio": 0.0, "rps": 0.0, "anchor_rps": anchor["rps"],
                           "cpu_us": None, "fwd": None, "errors": cand["errors"],
                           "p99": None, "failed": cand.get("ab_stderr", "no request completed")}
            continue
        found[mode] = {
            "ratio": cand["rps"] / anchor["rps"],
            "rps": cand["rps"],
            "anchor_rps": anchor["rps"],
            "cpu_us": 1e6 * cand["cpu_gw"] / 100 / cand["rps"],
            "fwd": (cand["forwarded"] or 0) / cand["complete"] if cand["complete"] else None,
            "errors": cand["errors"],
            "p99": cand["p99"],
            # The load side's share of its core: near 100, ab (or the sink beside it) and not
            # the gateway sets the pace, and fewer requests are in flight at the gateway.
            "load_cpu": (cand.get("cpu_ab") or 0) + (cand.get("cpu_sink") or 0),
            # The gateway's share of its core: under load from other processes, the smaller
            # it is the more CPU each request costs (cold caches after each preemption).
            "share": cand["cpu_gw"],
            **probed(cand),
        }
    return found


def probed(cand: dict[str, Any]) -> dict[str, Any]:
    """From ``harness.py``'s readings: the writer's commits per request and jobs per commit,
    the event loop thread's and the other threads' CPU per request (us), the load average."""
    probe, done = cand.get("probe"), cand["complete"]
    if not probe or not done:
        return {}
    hz = os.sysconf("SC_CLK_TCK")
    main = sum(t["ticks"] for t in probe["threads"] if t["main"])
    rest = sum(t["ticks"] for t in probe["threads"] if not t["main"])
    found = {"loop_us": 1e6 * main / hz / done, "threads_us": 1e6 * rest / hz / done,
             "loadavg": probe["loadavg"], "steal": probe["steal"],
             "outbox_mb": probe["outbox_bytes"] / 1e6}
    if probe.get("softirq"):
        cpu = next((t["cpu"] for t in probe["threads"] if t["main"]), 0)
        soft = probe["softirq"]
        found["softirq_us"] = 1e6 * soft.get(f"softirq/cpu{cpu}", 0) / hz / done
        found["ksoftirqd_us"] = 1e6 * sum(v for k, v in soft.items()
                                          if k.startswith("ksoftirqd/")) / hz / done
    if probe.get("speed_us"):
        found["speed_us"] = statistics.mean(probe["speed_us"])
        # CPU per request in thousandths of the probe's work measured beside it: what is left
        # of a level shift once the virtual CPU's own speed in that run is divided out.
        cpu_us = 1e6 * cand["cpu_gw"] / 100 / cand["rps"]
        found["cpu_norm"] = 1e3 * cpu_us / found["speed_us"]
    if probe.get("commits"):
        found["commits_per_req"] = probe["commits"] / done
        found["jobs_per_commit"] = probe["jobs"] / probe["commits"]
    return found


def spread(values: Sequence[float], fmt: str) -> str:
    if not values:
        return "-"
    return (f"{fmt.format(statistics.median(values))} "
            f"[{fmt.format(min(values))}..{fmt.format(max(values))}]")


def summary(a: Build, b: Build, modes: Sequence[str]) -> list[str]:
    with_env = "".join(f" {name}={value}" for name, value in b.env.items())
    lines = [f"A = {a.rev} ({a.commit[:10]}), B = {b.rev} ({b.commit[:10]}){with_env}; "
             "median [min..max] over rounds", ""]
    header = f"{'mode':<5} {'figure':<22} {'A':<26} {'B':<26} {'B / A (per round)':<24}"
    lines += [header, "-" * len(header)]
    for mode in modes:
        for key, label, fmt in (("ratio", f"rate / {ANCHOR[mode]}", "{:.2f}x"),
                                ("cpu_us", "gateway CPU us/request", "{:.0f}"),
                                ("rps", "req/s", "{:,.0f}"),
                                ("fwd", "fwd (sink / acked)", "{:.2f}"),
                                ("loop_us", "loop thread us/req", "{:.0f}"),
                                ("threads_us", "other threads us/req", "{:.0f}"),
                                ("commits_per_req", "commits / request", "{:.3f}"),
                                ("jobs_per_commit", "jobs / commit", "{:.1f}"),
                                ("speed_us", "CPU speed probe us", "{:,.0f}"),
                                ("cpu_norm", "CPU/request per probe", "{:.1f}"),
                                ("share", "gateway CPU %", "{:.0f}"),
                                ("load_cpu", "ab + sink CPU %", "{:.0f}"),
                                ("softirq_us", "softirq us/req, gw CPU", "{:.1f}"),
                                ("ksoftirqd_us", "ksoftirqd us/req", "{:.1f}"),
                                ("loadavg", "load average (1 min)", "{:.1f}")):
            av = [r[mode][key] for r in a.runs if r.get(mode, {}).get(key) is not None]
            bv = [r[mode][key] for r in b.runs if r.get(mode, {}).get(key) is not None]
            pairs = zip(a.runs, b.runs, strict=True)  # the same round, minutes apart
            quotients = [rb[mode][key] / ra[mode][key] for ra, rb in pairs
                         if ra.get(mode, {}).get(key) and rb.get(mode, {}).get(key) is not None]
            rel = spread(quotients, "{:.3f}") if key in ("ratio", "cpu_us", "loop_us",
                                                         "threads_us", "cpu_norm") else ""
            lines.append(f"{mode:<5} {label:<22} {spread(av, fmt):<26} {spread(bv, fmt):<26} {rel}")
    lines.append("")
    lines.append("B / A above 1 in 'rate' is B faster; below 1 in 'CPU' is B cheaper. A range that "
                 "straddles 1.000 is not a difference.")
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev_a", help="the revision to compare against (e.g. main, a commit)")
    parser.add_argument("rev_b", help="the revision under test")
    parser.add_argument("--shared", type=Path, default=os.environ.get("WABA_BENCH_SHARED"),
                        help="the shared harness's folder (default: $WABA_BENCH_SHARED)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each revision (default 3)")
    parser.add_argument("--modes", default="ka,new", help="ka and/or new (default ka,new)")
    parser.add_argument("--duration", type=int, default=8, help="seconds per measurement")
    parser.add_argument("--extras", default="",
                        help="install REV[EXTRAS] instead of the plain install (e.g. speed)")
    parser.add_argument("--outbox-url", help="PostgreSQL outbox for both (WABA_BENCH_OUTBOX_URL)")
    parser.add_argument("--workdir", type=Path,
                        help="keep builds here and reuse them (default: a temp dir, removed)")
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    parser.add_argument("--run-timeout", type=float, default=900, help="seconds per harness run")
    parser.add_argument("--own-adapter", action="store_true",
                        help="serve each revision with its own bench/candidate.sh (default: this"
                        " checkout's for both)")
    parser.add_argument("--env-b", action="append", default=[], metavar="NAME=VALUE",
                        help="set this for B's runs only: one revision with and without a knob"
                        " of candidate.sh (e.g. WABA_BENCH_TRACING_ENDPOINT=URL)")
    parser.epilog = "Options after -- go to the harness as they are (e.g. -- --server-key ecdsa)."
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: len(argv) - len(rest) - (1 if "--" in argv else 0)])
    args.harness_args = rest
    if args.shared is None or not (Path(args.shared) / "bench.py").is_file():
        parser.error("--shared DIR (or $WABA_BENCH_SHARED): the folder with the harness's bench.py")
    args.shared = Path(args.shared).resolve()
    modes = args.modes.split(",")
    if not modes or set(modes) - set(ANCHOR):
        parser.error("--modes: ka, new or ka,new")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="waba-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    modes = args.modes.split(",")
    try:
        a = build(args.rev_a, work, args.extras, args.own_adapter)
        b = build(args.rev_b, work, args.extras, args.own_adapter)
        b.env = dict(item.split("=", 1) for item in args.env_b)
        for round_no in range(1, args.rounds + 1):
            for item in (a, b) if round_no % 2 else (b, a):
                out = work / f"run-{round_no}-{item.commit[:10]}.json"
                found = run_harness(args, item, round_no, out)
                item.runs.append(found)
                log(f"round {round_no}: {item.rev}: " + "  ".join(
                    f"{mode} FAILED ({f['failed']})" if "failed" in f else
                    f"{mode} {f['ratio']:.2f}x {ANCHOR[mode]} ({f['rps']:,.0f} req/s, "
                    f"{f['cpu_us']:.0f} us CPU/req, fwd {f['fwd']:.2f}"
                    + (f", loop {f['loop_us']:.0f} + threads {f['threads_us']:.0f} us/req"
                       if "loop_us" in f else "")
                    + (f", {f['commits_per_req']:.3f} commits/req" if "commits_per_req" in f
                       else "")
                    + (f", probe {f['speed_us']:,.0f} us" if "speed_us" in f else "")
                    + (f", load {f['loadavg']:.1f})" if "loadavg" in f else ")")
                    for mode, f in found.items()))
        print("\n".join(summary(a, b, modes)))
        if args.json:
            args.json.write_text(json.dumps(
                {"a": {"rev": a.rev, "commit": a.commit, "runs": a.runs},
                 "b": {"rev": b.rev, "commit": b.commit, "runs": b.runs},
                 "modes": modes, "rounds": args.rounds, "duration": args.duration,
                 "extras": args.extras}, indent=1))
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
