#!/usr/bin/env bash
# The DDPM GPU run of issues 7 and 13 in ONE call, from the repository root on the GPU machine:
#
#     bash bench/ddpm_gpu.sh          # sa and s (the README's H100 table)
#     # issue 13's digit-1 rows, three calls on the same warm machine (the later ones reuse the trained models):
#     DDPM_GPU_METHODS=remap_surgery,salun,selective_amnesia bash bench/ddpm_gpu.sh
#     DDPM_GPU_REUSE=1 DDPM_GPU_METHODS=salun_surgery,selective_amnesia_surgery,sa,s bash bench/ddpm_gpu.sh
#
# DDPM_GPU_FORGET (comma-separated digits: one oracle each, trained at once with the DDPM), DDPM_GPU_METHODS,
# DDPM_GPU_SEEDS, DDPM_GPU_REUSE=1 (keep /tmp/gsu_ddpm_gpu's finished models) and DDPM_GPU_UNCONDITIONAL=1 (train
# and unlearn unconditional DDPMs; salun, which needs labels, is left out) select the run; results per digit go to
# $OUT/forget_<digit>/.
#
# Trains the class-conditional MNIST DDPM of configs/mnist_ddpm.py (and its evaluator) and, at the same time, its
# oracle (same recipe without digit 1) on the carried MNIST test set (.carry/mnist, 10,000 digits, stratified 10%
# held out) with as many epochs as the time budget affords (measured epoch time), then runs
# configs/unlearn_mnist_ddpm.py from them: unlearns the digit with the config's methods and reports forget fraction,
# FID and the forget-label protocol (samples generated from that label) before and after.
# Writes to $OUT: results.json (epochs, timings, headline numbers), model_samples.png, oracle_<digit>_samples.png,
# forget_<digit>/{report.md,report.json,samples/<method>.png,forget_fraction.png,logs/<method>.csv}, one log per phase.
#
# Expected GPU runtime: about 8.5-9 minutes on one H100 with the default sa and s (probe ~1 min; the DDPM and the
# oracle trained at once ~4 min; unlearning ~3 min: compiling two methods and the samplers, 2 x 50 monitored steps,
# six evaluations), about 100 s per further method, digit and seed. The number of epochs is what fits
# DDPM_GPU_BUDGET_S (default 520 s) at the measured epoch time after reserving the unlearning (results.json says how
# many; configs/mnist_ddpm.py asks for 200); a call whose unlearning would leave under 40 % of the budget for training
# is refused before any work (with DDPM_GPU_REUSE=1, one whose unlearning exceeds the budget); the outer timeout
# (540 s) is the backstop.
# Needs: Python 3.12 + JAX 0.11 (CUDA) + flax/optax/orbax/chex/absl; ml_collections from .whl/ (installed here);
# no gsu_jax install (PYTHONPATH=.), no TFDS, no internet.
# CPU check (tiny configs on the embedded digits, about 3-5 minutes on the 2-core machine):
#     DDPM_GPU_SMOKE=1 DDPM_GPU_BUDGET_S=900 DDPM_GPU_TIMEOUT_S=960 OUT=/tmp/ddpm_gpu bash bench/ddpm_gpu.sh
set -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/ddpm_gpu}"
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install --no-index --no-deps .whl/*.whl > "$OUT/pip.log" 2>&1 || tail -3 "$OUT/pip.log"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia_smi.csv" 2>&1 || true
EXTRA=()
if [ "${DDPM_GPU_SMOKE:-0}" = 1 ]; then EXTRA+=(--smoke); fi
if [ "${DDPM_GPU_REUSE:-0}" = 1 ]; then EXTRA+=(--reuse); fi
if [ -n "${DDPM_GPU_METHODS:-}" ]; then EXTRA+=(--methods "$DDPM_GPU_METHODS"); fi
if [ -n "${DDPM_GPU_SEEDS:-}" ]; then EXTRA+=(--seeds "$DDPM_GPU_SEEDS"); fi
if [ "${DDPM_GPU_UNCONDITIONAL:-0}" = 1 ]; then EXTRA+=(--unconditional); fi
timeout "${DDPM_GPU_TIMEOUT_S:-540}" python3 bench/ddpm_gpu.py run --out "$OUT" \
  --budget-s "${DDPM_GPU_BUDGET_S:-520}" --forget-classes "${DDPM_GPU_FORGET:-1}" "${EXTRA[@]}" 2>&1 \
  | tee "$OUT/ddpm_gpu.log"
