"""What loading a configuration costs: the example file read, expanded and validated
(``load_config``), and importing ``gateway.config`` in a fresh interpreter. Prints microseconds
per load, the median of the rounds and their range.

    python bench/config_load.py [--rounds 7] [--loads 2000] [--config config/gateway.example.toml]

For a count that does not move with the machine's load, run a fixed number of loads under
callgrind and compare the instruction totals of two revisions (each in its own environment):

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python bench/config_load.py --rounds 1 --loads 200
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from gateway.config import load_config

# The example file's ${NAME} references, with throw-away values.
_ENV = {
    "WABA_VERIFY_TOKEN": "bench-verify-token",
    "WABA_APP_SECRET": "bench-app-secret",
    "ANALYTICS_WEBHOOK_SECRET": "bench-target-secret",
    "WABA_ADMIN_TOKEN": "bench-admin-token-" + "0" * 32,
}


def _import_ms() -> float:
    """Wall time of ``import gateway.config`` in a fresh interpreter, less an empty one's."""

    def run(code: str) -> float:
        started = time.perf_counter()
        # This interpreter, with code written here.
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)  # noqa: S603
        return time.perf_counter() - started

    return (run("import gateway.config") - run("pass")) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--loads", type=int, default=2000)
    parser.add_argument("--config", type=Path, default=Path("config/gateway.example.toml"))
    args = parser.parse_args()
    per_load: list[float] = []
    imports: list[float] = []
    for _ in range(args.rounds):
        started = time.perf_counter()
        for _ in range(args.loads):
            load_config(args.config, _ENV)
        per_load.append((time.perf_counter() - started) / args.loads * 1e6)
        if args.rounds > 1:
            imports.append(_import_ms())
    print(
        f"load_config: {statistics.median(per_load):.1f} us per load"
        f" [{min(per_load):.1f}..{max(per_load):.1f}], {args.rounds} rounds of {args.loads}"
    )
    if imports:
        print(
            f"import gateway.config: {statistics.median(imports):.1f} ms"
            f" [{min(imports):.1f}..{max(imports):.1f}] over an empty interpreter"
        )


if __name__ == "__main__":
    main()
