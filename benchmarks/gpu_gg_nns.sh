#!/usr/bin/env bash
# One GPU call (about 5 minutes, at most ~8): the GPU tests of the batched top-k selection and the
# CUDA-graphed training step, the GG step benchmark of issue 5, then a time-boxed NNs run of issue 6.
# On the device machine: OUT=... bash benchmarks/gpu_gg_nns.sh   (MNIST travels as .gpu_data/mnist/*.gz)
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1 SUPSUP_DATA=${SUPSUP_DATA:-.gpu_data}
OUT=${OUT:?set OUT}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv > "$OUT/nvidia-smi.txt" 2>&1
cat "$OUT/nvidia-smi.txt"; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

timeout "${TEST_SECONDS:-120}" python3 -m pytest -q -p no:cacheprovider tests/test_learners.py tests/test_kernels.py \
  -k "cuda or gpu or triton" > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests exit $?"; tail -n 15 "$OUT/gpu_tests.log"

timeout "${GG_SECONDS:-150}" python3 -c "
import json
from benchmarks.gg_step import run
result = run('cuda', quick=False)
json.dump(result, open('$OUT/gg_step.json', 'w'), indent=1)
print(json.dumps(result))" > "$OUT/gg_step.log" 2>&1
echo "gg_step exit $?"; tail -c 3000 "$OUT/gg_step.log"

timeout "${NNS_SECONDS:-190}" python3 -m supsup run nns-permuted-mnist --device cuda --tasks 2500 \
  --train-seconds "${NNS_TRAIN_SECONDS:-120}" --eval-seconds "${NNS_EVAL_SECONDS:-30}" \
  --data-root "$SUPSUP_DATA" --out "$OUT/nns" > "$OUT/nns.log" 2>&1
echo "nns exit $?"; tail -n 25 "$OUT/nns.log"
