#!/usr/bin/env bash
# The one GPU call of a session (about 8 minutes): issue 4's kernel checks and benchmarks first, on an idle
# GPU, then the accuracy runs of issues 2 and 3 in parallel until a common deadline.
# On the device machine: OUT=... bash benchmarks/gpu_session.sh   (MNIST travels as .gpu_data/mnist/*.gz)
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1 SUPSUP_DATA=${SUPSUP_DATA:-.gpu_data}
OUT=${OUT:?set OUT}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv > "$OUT/nvidia-smi.txt" 2>&1
cat "$OUT/nvidia-smi.txt"
timeout "${BENCH_SECONDS:-230}" python3 benchmarks/gpu_check.py --out "$OUT" > "$OUT/gpu_check.log" 2>&1
echo "gpu_check exit $?"; tail -n 40 "$OUT/gpu_check.log"
SECONDS_LEFT=${ACCURACY_SECONDS:-280} bash benchmarks/gpu_accuracy.sh
