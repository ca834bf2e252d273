"""Coverage-guided fuzzing (atheris, libFuzzer) of the HTTP/1.1 core (gateway.edge.http1).

Run it with ``fuzz/run.sh [SECONDS] http1``: seeded with the request streams in
``fuzz/http1-seeds/``. Not part of the default test run.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from edge_invariants import check_stream


def main() -> None:
    atheris.Setup(sys.argv, check_stream)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
