#!/usr/bin/env bash
# A/B of the CGE engine against an older revision on the same machine, in CPU time (time.process_time: what each
# process itself used, whatever else the machine runs), interleaved, one thread each:
#     bench/engine_ab.sh [OLD_REV (default 61fde83: the torch.fx engine)] [ROUNDS (default 2)]
# The old revision is checked out into a temporary git worktree and its _C built there (a flat layout before the
# src/ move: PYTHONPATH points at it). Both sides run their own bench/cge_resnet20.py on the same arguments.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OLD_REV=${1:-61fde83}; ROUNDS=${2:-2}
PY="$ROOT/.venv/bin/python"
OLD=$(mktemp -d)/zokernels_old
git -C "$ROOT" worktree add -q --detach "$OLD" "$OLD_REV"
trap 'git -C "$ROOT" worktree remove --force "$OLD"' EXIT
cmake -S "$OLD" -B "$OLD/build" -G Ninja -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$PY" \
  -DZOKERNELS_OUTPUT_DIR="$OLD/zokernels" -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build "$OLD/build" --parallel 2 > /dev/null
ARGS="--batch 64 --engine-sample 6 --baseline-sample 1 --oracle-coordinates 4 --threads 1"
RUN='import sys, time, runpy; time.perf_counter = time.process_time; sys.argv = ["cge_resnet20.py"] + sys.argv[1:]; runpy.run_path("cge_resnet20.py", run_name="__main__")'
KEEP="engine_step_s|baseline_step_s|engine_max_err|load_avg_1min:"
for round in $(seq "$ROUNDS"); do
  (cd "$OLD/bench" && OMP_NUM_THREADS=1 PYTHONPATH="$OLD" "$PY" -c "$RUN" $ARGS 2>&1 | grep -E "$KEEP" | sed "s/^/old r$round /")
  (cd "$ROOT/bench" && OMP_NUM_THREADS=1 "$PY" -c "$RUN" $ARGS 2>&1 | grep -E "$KEEP" | sed "s/^/new r$round /")
done
git -C "$ROOT" checkout -q -- bench/results/cge_resnet20.csv  # its rows are CPU times under wall-time names
