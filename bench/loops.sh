#!/usr/bin/env bash
# The event loops, interleaved: a previous revision (on asyncio), this checkout on asyncio and
# this checkout on uvloop, each round through the shared harness with the plain receiver
# (ref-1p) beside it. Then `python bench/cpu_per_request.py OUTDIR` prints the figures.
#
#   bench/loops.sh SHARED_BENCH_DIR PREVIOUS_CHECKOUT OUTDIR [ROUNDS]
#
# PREVIOUS_CHECKOUT: e.g. `git worktree add /tmp/prev <rev>`. Revisions before listen.loop ran
# on uvloop whenever it was installed: a `uvloop` package that raises ImportError, first on its
# PYTHONPATH, keeps it on asyncio.
set -euo pipefail
shared=$1 previous=$2 out=$3 rounds=${4:-3}
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python=${WABA_BENCH_PYTHON:-python3}
mkdir -p "$out/no-uvloop/uvloop"
echo 'raise ImportError("left out: the asyncio loop is measured")' >"$out/no-uvloop/uvloop/__init__.py"
cd "$shared"
for round in $(seq 1 "$rounds"); do
  for variant in previous asyncio uvloop; do
    case $variant in
      previous) candidate="bash $previous/bench/candidate.sh"; env=(PYTHONPATH="$out/no-uvloop") ;;
      *) candidate="bash $here/candidate.sh"; env=(WABA_BENCH_LOOP="$variant") ;;
    esac
    echo "=== round $round: $variant"
    env "${env[@]}" WABA_BENCH_PYTHON="$python" "$python" "$here/harness.py" ./bench.py \
      --targets ref-1p,candidate --modes ka,new --rounds 1 --duration 10 \
      --candidate "$candidate" --json "$out/loops-$round-$variant.json" 2>"$out/loops-$round-$variant.err"
  done
done
