#!/usr/bin/env bash
# Fuzz body parsing and routing for a bounded time (default 60 s), seeded with Meta's samples.
#   bash fuzz/run.sh [SECONDS]
# Needs the fuzz extra: pip install -e '.[fuzz]'. Findings (crashing inputs) are written to
# fuzz/findings/; each is a body that makes fuzz/edge_invariants.py's check fail.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
seconds="${1:-60}"
corpus="$(mktemp -d)"
trap 'rm -rf "$corpus"' EXIT
cp "$HERE"/../examples/*.json "$corpus"/
mkdir -p "$HERE/findings"
cd "$HERE"
PYTHONPATH="$HERE/..:$HERE${PYTHONPATH:+:$PYTHONPATH}" exec python fuzz_edge.py \
    -max_total_time="$seconds" -artifact_prefix="$HERE/findings/" -timeout=10 -rss_limit_mb=2048 \
    "$corpus"
