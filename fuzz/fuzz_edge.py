"""Coverage-guided fuzzing (atheris, libFuzzer) of body parsing and routing.

Run it with ``fuzz/run.sh [SECONDS]``: it seeds the corpus with Meta's sample payloads from
``examples/`` and stops after the given time. Not part of the default test run.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from edge_invariants import check_body


def main() -> None:
    atheris.Setup(sys.argv, check_body)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
