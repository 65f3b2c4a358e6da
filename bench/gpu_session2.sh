#!/usr/bin/env bash
# The one GPU call of session 2 (issues 6 and 7), from the repository root on the GPU machine:
#
#     bash bench/gpu_session2.sh
#
# 1. bench/ddpm_gpu.sh: train the MNIST DDPM and its oracle, unlearn digit 1 with sa and s (budget 450 s);
# 2. python -m bench.sharding --gpu: what one device sustains (examples/s) at the largest batch that fits, found by compiling each doubling against the device memory; its 110 s budget is a backstop (a search it stops says so), the call gets 130 s.
# Needs the carried .whl/ (ml_collections) and .carry/mnist (the MNIST test set); writes $OUT/ddpm and
# $OUT/sharding. Expected total: at most 465 + 130 s, under the 600 s per-command limit.
set -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu_session2}"
mkdir -p "$OUT/ddpm" "$OUT/sharding"
OUT="$OUT/ddpm" DDPM_GPU_BUDGET_S="${DDPM_GPU_BUDGET_S:-450}" DDPM_GPU_TIMEOUT_S="${DDPM_GPU_TIMEOUT_S:-465}" \
  bash bench/ddpm_gpu.sh > "$OUT/ddpm_gpu.out" 2>&1
echo "ddpm_gpu.sh exit $?" >> "$OUT/ddpm_gpu.out"
tail -5 "$OUT/ddpm_gpu.out"
PYTHONPATH=. PYTHONUNBUFFERED=1 timeout "${SHARDING_TIMEOUT_S:-130}" python3 -m bench.sharding --gpu --out "$OUT/sharding" \
  > "$OUT/sharding.out" 2>&1
echo "bench.sharding exit $?" >> "$OUT/sharding.out"
tail -25 "$OUT/sharding.out"
