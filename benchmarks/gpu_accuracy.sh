#!/usr/bin/env bash
# Accuracy runs for the GPU machine (issues 2, 3, 6), launched in parallel on one GPU.
# Usage: OUT=dir [DEVICE=cuda] [SECONDS_LEFT=300] [TINY=1] bash benchmarks/gpu_accuracy.sh
# TINY=1 shrinks every run to a few batches (a dry run of this script on the CPU). Every command stops at a
# common deadline (SECONDS_LEFT from now); runs save their curve as they go, so a cut run still reports.
# Leaves in $OUT: accuracy_summary.json and runs.tgz (logs and JSON, no checkpoints).
set -u
OUT=${OUT:?set OUT}; DEVICE=${DEVICE:-cuda}; W=${WORK:-/tmp/supsup-runs}; rm -rf "$W"; mkdir -p "$W"
DEADLINE=$(( $(date +%s) + ${SECONDS_LEFT:-300} ))
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 SUPSUP_DATA=${SUPSUP_DATA:-.gpu_data}
R="python3 -m supsup run --device $DEVICE"
E="python3 -m supsup eval --device $DEVICE"
if [ "${TINY:-0}" = 1 ]; then
  S5="--tasks 2 --batches-per-task 3"; S20="--tasks 3 --batches-per-task 3"; S50="--tasks 3 --batches-per-task 3"
  S250="--tasks 4 --batches-per-task 3"; SROT="--tasks 3 --batches-per-task 3"; S2500="--tasks 4 --batches-per-task 2"
  SNNS="--tasks 2 --batches-per-task 100"
else
  S5="--tasks 5"; S20="--tasks 20"; S50="--tasks 50"; S250=""; SROT=""; S2500="--tasks-at-once 50"; SNNS="--tasks 100"
fi
python3 -m supsup fetch || exit 1  # verify (and decompress) MNIST once before the parallel jobs
job() {  # name, then the commands of one job (run in sequence, logged to $W/name.log)
  local name=$1; shift
  ( for cmd in "$@"; do
      left=$(( DEADLINE - $(date +%s) )); [ $left -gt 5 ] || { echo "SKIPPED (deadline): $cmd"; continue; }
      echo "+ $cmd"; eval "timeout $left $cmd" || echo "FAILED or cut at the deadline: $cmd"
    done ) > "$W/$name.log" 2>&1 &
}
job fc5      "$R permuted-mnist $S5 --out $W/fc5"
job lenet5   "$R permuted-mnist-lenet $S5 --out $W/lenet5"
job lenet50  "$R permuted-mnist-lenet $S50 --out $W/lenet50" "$E $W/lenet50 --objective g" \
             "$E $W/lenet50 --granularity sample"
job fc20g    "$R permuted-mnist-g $S20 --out $W/fc20g"
job rot36    "$R rotated-mnist $SROT --out $W/rot36"
job fc250    "$R permuted-mnist $S250 --tasks-at-once 10 --out $W/fc250" "$E $W/fc250 --objective g"
job lenet250 "$R permuted-mnist-lenet $S250 --tasks-at-once 10 --out $W/lenet250" "$E $W/lenet250 --objective g"
job lenet2500 "$R permuted-mnist-2500 $S2500 --out $W/lenet2500"
job nns100   "$R nns-permuted-mnist $SNNS --out $W/nns100"
wait
# one small summary file: every results/eval JSON without the per-task lists
python3 - "$W" > "$OUT/accuracy_summary.json" <<'PY'
import json, pathlib, sys
out = {}
for f in sorted(pathlib.Path(sys.argv[1]).glob("*/*.json")):  # results, eval-*, partial curves
    d = json.loads(f.read_text())
    out[f"{f.parent.name}/{f.name}"] = {k: v for k, v in d.items() if k not in ("config",)}
print(json.dumps(out, indent=1))
PY
tar czf "$OUT/runs.tgz" --exclude='*.safetensors' -C "$(dirname "$W")" "$(basename "$W")"
tail -n 3 "$W"/*.log
