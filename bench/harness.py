#!/usr/bin/env python3
"""Run the shared benchmark harness unchanged, except that its preflight waits for forwarding.

Rule: nothing that is measured changes. The shared harness's functional preflight reads the
sink's request counter right after each 200 and fails the run unless exactly one request was
forwarded. That holds for gateways that forward before they answer (nginx, the reference
gateway); this gateway answers once the notification is in the outbox and forwards after, so
whether the forward lands before the counter is read is a race of a millisecond, lost more often
than not. This wrapper loads the harness's ``bench.py`` as a module and makes the preflight's
HTTPS helper wait ``--settle-s`` after each answer; the ``ab`` runs never use that helper.

It also takes readings around each measured run of the candidate (``roundprobe.py``: the
outbox writer's commits, each thread's CPU, the load average) and adds them to the harness's
JSON (``--json``) as each candidate run's ``probe``; the writer's commits need the candidate's
admin API on ``$WABA_BENCH_ADMIN_PORT`` (``candidate.sh`` opens it there when that is set).

Usage: python bench/harness.py PATH/TO/shared/bench/bench.py [--settle-s 1.0] [bench.py options]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from roundprobe import Probe

__all__ = ["main"]

# With [listen] workers > 1, a notification stored by a worker other than the first reaches the
# dispatcher at its next poll ([dispatcher] poll_interval_s, 0.5 s by default).
DEFAULT_SETTLE_S = 1.0


def _settling(post: Callable[..., Any], settle_s: float) -> Callable[..., Any]:
    def settled(*args: Any, **kwargs: Any) -> Any:
        status = post(*args, **kwargs)
        time.sleep(settle_s)
        return status

    return settled


def _probing(harness: Any, probe: Probe) -> None:
    """Wrap the harness's ``Proc`` and ``run_ab`` so that ``probe`` sees each measured run."""
    base = harness.Proc

    class Proc(base):  # type: ignore[misc, valid-type]
        def __init__(self, name: str, argv: list[str], env: dict[str, str], *rest: Any,
                     **kwargs: Any) -> None:
            super().__init__(name, argv, env, *rest, **kwargs)
            probe.started(self, name, env)

    run_ab = harness.run_ab

    def probed(url: str, **kwargs: Any) -> Any:
        # The harness passes csv_path only to the measured run, not to the warm-up.
        return probe.around(url, kwargs.get("csv_path") is not None,
                            lambda: run_ab(url, **kwargs))

    harness.Proc = Proc
    harness.run_ab = probed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, add_help=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("harness", help="the shared harness's bench.py")
    parser.add_argument("--settle-s", type=float, default=DEFAULT_SETTLE_S,
                        help="seconds the preflight waits after each answer")
    args, rest = parser.parse_known_args(argv)
    spec = importlib.util.spec_from_file_location("shared_bench", args.harness)
    if spec is None or spec.loader is None:
        parser.error(f"cannot load {args.harness}")
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    harness.https_post = _settling(harness.https_post, args.settle_s)
    port = os.environ.get("WABA_BENCH_ADMIN_PORT")
    probe = Probe(admin_port=int(port) if port else None)
    _probing(harness, probe)
    sys.argv = [args.harness, *rest]  # the harness parses sys.argv itself
    harness.main()
    out = rest[rest.index("--json") + 1] if "--json" in rest[:-1] else None
    if out and os.path.exists(out):
        with open(out) as file:
            result = json.load(file)
        probe.annotate(result)
        with open(out, "w") as file:
            json.dump(result, file, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
