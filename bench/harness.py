#!/usr/bin/env python3
"""Run the shared benchmark harness unchanged, except that its preflight waits for forwarding.

Rule: nothing that is measured changes. The shared harness's functional preflight reads the
sink's request counter right after each 200 and fails the run unless exactly one request was
forwarded. That holds for gateways that forward before they answer (nginx, the reference
gateway); this gateway answers once the notification is in the outbox and forwards after, so
whether the forward lands before the counter is read is a race of a millisecond, lost more often
than not. This wrapper loads the harness's ``bench.py`` as a module and makes the preflight's
HTTPS helper wait ``--settle-s`` after each answer; the ``ab`` runs never use that helper.

Usage: python bench/harness.py PATH/TO/shared/bench/bench.py [--settle-s 1.0] [bench.py options]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

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
    sys.argv = [args.harness, *rest]  # the harness parses sys.argv itself
    harness.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
