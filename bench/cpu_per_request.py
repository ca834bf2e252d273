"""Print what bench/loops.sh measured: per variant, target and mode, the rate and the gateway's
CPU per request (microseconds: its CPU share over the run divided by the requests answered), each
round and the median. CPU per request moves less than the rate when other work shares the
machine, since it does not count the time the gateway waited for a core.

    python bench/cpu_per_request.py OUTDIR
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def main(folder: Path) -> None:
    rows: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for path in sorted(folder.glob("loops-*-*.json"), key=lambda p: int(p.stem.split("-")[1])):
        variant = path.stem.split("-", 2)[2]
        for run in json.loads(path.read_text())["runs"]:
            cpu_us = run["cpu_gw"] / 100 / run["rps"] * 1e6
            rows.setdefault((variant, run["target"], run["mode"]), []).append((run["rps"], cpu_us))
    for (variant, target, mode), values in sorted(rows.items()):
        rates = " / ".join(f"{rps:,.0f}" for rps, _ in values)
        cpus = " / ".join(f"{cpu:,.0f}" for _, cpu in values)
        median = statistics.median(cpu for _, cpu in values)
        print(f"{variant:8} {target:9} {mode:3}  req/s {rates}  |  CPU us/request {cpus}"
              f"  (median {median:,.0f})")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
