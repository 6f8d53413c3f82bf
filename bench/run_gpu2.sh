#!/usr/bin/env bash
# The GPU checks of issue 13 in one command, budgeted for < 7 minutes on one H200 (each step has its
# own timeout, so a slow step cannot eat the next one's time; results written so far are kept):
#   1. the CUDA tests (tests/test_math.py, tests/test_batched.py -k cuda; no ComfyUI host needed)  ≤ 70 s
#   2. SDXL scale, cold and warm vs the full-SVD recipe on the same device                        ≤ 200 s
#      (bench_transfer --scale sdxl --spectrum gapped --device cuda; the recipe runs a stratified
#       sample and the rest within --recipe-budget seconds, else extrapolates, marked as such)
#   3. bench_scale on cuda: batched vs per-module bases (SDXL part), Flux-dev and Wan-14B blocks     ≤ 150 s
# Results go to $OUT (default bench/gpu-out): results-*.md, result-*.json, logs.
# Python: $PYTHON, else .venv/bin/python when it sees a CUDA device, else python3 (needs torch with
# CUDA, safetensors, xxhash, psutil, numpy, pytest, hypothesis). Data: $PROLORA_BENCH_DIR (default /tmp/prolora-bench).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PROLORA_BENCH_DIR="${PROLORA_BENCH_DIR:-/tmp/prolora-bench}"
OUT="${OUT:-bench/gpu-out}"
mkdir -p "$OUT"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]] && .venv/bin/python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    PY=.venv/bin/python
  else
    PY=python3
  fi
fi
t0=$SECONDS
step() { echo "[run_gpu2 +$((SECONDS - t0))s] $*" | tee -a "$OUT/steps.log"; }
step "python: $PY"
"$PY" - <<'PYEOF' 2>&1 | tee -a "$OUT/steps.log"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for m in ("safetensors", "xxhash", "psutil", "numpy", "pytest", "hypothesis"):
    try:
        importlib.import_module(m)
    except ImportError as e:
        print("MISSING", m, e)
PYEOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$OUT/steps.log" || true

step "1. CUDA tests"
PYTHONPATH="$PWD/tests:$PYTHONPATH" timeout 70 "$PY" -m pytest --noconftest -q -rs tests/test_math.py tests/test_batched.py -k cuda 2>&1 | tee "$OUT/tests-cuda.log"
step "tests exit ${PIPESTATUS[0]}"

step "2. SDXL cold/warm vs the full-SVD recipe"
timeout 200 "$PY" -m bench.bench_transfer --scale sdxl --spectrum gapped --device cuda --recipe-budget 60 2>&1 | tee "$OUT/sdxl.log"
step "sdxl exit ${PIPESTATUS[0]}"
cp bench/results-sdxl-cuda.md "$OUT/" 2>/dev/null || true
cp "$PROLORA_BENCH_DIR"/sdxl-gapped-*/run-cuda/result.json "$OUT/result-sdxl-cuda.json" 2>/dev/null || true

step "3. batched vs per-module, Flux-dev and Wan-14B blocks"
timeout 150 "$PY" -m bench.bench_scale --device cuda --parts batch,flux,wan 2>&1 | tee "$OUT/scale.log"
step "scale exit ${PIPESTATUS[0]}"
cp bench/results-scale-cuda.md "$OUT/" 2>/dev/null || true
cp "$PROLORA_BENCH_DIR"/scale-run-cuda/result.json "$OUT/result-scale-cuda.json" 2>/dev/null || true
step "done"
