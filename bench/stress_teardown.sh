#!/usr/bin/env bash
# Repeats the 2-process CPU (Gloo) training run of tests/test_distributed.py::test_cli_nproc_2_then_resume_with_1_process
# (its first command) N times and counts the runs that fail; a failure's stderr tail goes to the log.
# Usage: bench/stress_teardown.sh N LOG   (run from the repository root; PYTHON defaults to python)
# With CORES=folder, the processes may dump core (core_pattern permitting) and a failed run's cores go there.
set -u
if [ -n "${CORES:-}" ]; then ulimit -c unlimited; mkdir -p "$CORES"; fi
N=${1:-30}; LOG=${2:-/tmp/stress_teardown.log}
PY=${PYTHON:-python}
fails=0
: > "$LOG"
for i in $(seq 1 "$N"); do
  dir=$(mktemp -d)
  (cd "$dir" && OMP_NUM_THREADS=1 MASTER_ADDR=127.0.0.1 "$PY" -m mobilenet_fn train --alpha 0.25 --batch-size 32 --device cpu \
    --workers 0 --compile off --nproc 2 --epochs 1 --out "$dir/run" > "$dir/out" 2> "$dir/err")
  rc=$?
  if [ $rc -ne 0 ]; then
    fails=$((fails + 1))
    echo "run $i: FAIL rc=$rc" >> "$LOG"
    tail -c 4000 "$dir/err" | sed 's/^/    /' >> "$LOG"
    if [ -n "${CORES:-}" ]; then for c in "$dir"/core*; do [ -e "$c" ] && mv "$c" "$CORES/run$i-$(basename "$c")"; done; fi
  else
    echo "run $i: ok" >> "$LOG"
  fi
  rm -rf "$dir"
done
echo "DONE: $fails failures in $N runs" >> "$LOG"
