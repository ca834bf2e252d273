#!/usr/bin/env bash
# Fuzz for a bounded time (default 60 s): body parsing and routing (seeded with Meta's samples),
# or the HTTP/1.1 core (seeded with fuzz/http1-seeds/).
#   bash fuzz/run.sh [SECONDS] [body|http1]
# Needs the fuzz extra: pip install -e '.[fuzz]'. Findings (crashing inputs) are written to
# fuzz/findings/; each is an input that makes a check of fuzz/edge_invariants.py fail.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
seconds="${1:-60}"
target="${2:-body}"
corpus="$(mktemp -d)"
trap 'rm -rf "$corpus"' EXIT
case "$target" in
  body) script=fuzz_edge.py; cp "$HERE"/../examples/*.json "$corpus"/; limits=() ;;
  # Inputs stay under the head limit, where no cut into reads can change what is counted.
  http1) script=fuzz_http1.py; cp "$HERE"/http1-seeds/* "$corpus"/; limits=(-max_len=4096) ;;
  *) echo "run.sh: unknown target '$target' (body or http1)" >&2; exit 2 ;;
esac
mkdir -p "$HERE/findings"
cd "$HERE"
PYTHONPATH="$HERE/..:$HERE${PYTHONPATH:+:$PYTHONPATH}" exec python "$script" \
    -max_total_time="$seconds" -artifact_prefix="$HERE/findings/" -timeout=10 -rss_limit_mb=2048 \
    "${limits[@]}" "$corpus"
