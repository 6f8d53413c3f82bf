#!/usr/bin/env bash
# The benchmark on a CUDA machine, in one command (budgeted for < 8 minutes on one H100/H200 class GPU):
#   --scale ci   --spectrum both    (22 modules, gapped + power-law)
#   --scale sdxl --spectrum gapped  (722 modules; the full-SVD recipe runs on every module when it is
#                                     estimated to fit in --recipe-budget seconds, else it is extrapolated)
# Results: bench/results-ci-cuda.md, bench/results-sdxl-cuda.md (copied to $OUT too when it is set).
# Extra arguments go to both runs (e.g. --data-dir /scratch/prolora-bench).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
save() {  # results leave the machine through $OUT when it is set (the device tool's output folder)
  if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then
    cp bench/results-*-cuda.md "$OUT"/ 2>/dev/null || true
    local data="${PROLORA_BENCH_DIR:-${TMPDIR:-/tmp}/prolora-bench}" r
    for r in "$data"/*/run-cuda/result.json; do
      if [[ -f "$r" ]]; then cp "$r" "$OUT/result-$(basename "$(dirname "$(dirname "$r")")" | cut -d- -f1,2).json"; fi
    done
  fi
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -m bench.bench_transfer --scale ci --spectrum both --device cuda "$@"
save
"$PY" -m bench.bench_transfer --scale sdxl --spectrum gapped --device cuda --recipe-budget 120 "$@"
save
