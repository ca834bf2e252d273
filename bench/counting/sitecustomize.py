"""Counts in a gateway a bench starts (see bench/counts.py): on its PYTHONPATH only then."""

import os
import sys

if os.environ.get("WABA_BENCH_COUNTS"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import counts

    counts.serve_from_environment()
