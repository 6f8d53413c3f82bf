#!/usr/bin/env bash
# The demo: sets up .venv and the ComfyUI host if needed, starts a real headless ComfyUI with the
# pack, runs example workflow (a) through the API, writes demo_output/grid.png and report.png, stops.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
# --out keeps working from any directory: a relative path is made absolute before the cd.
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) [[ $# -ge 2 ]] || { echo "demo.sh: --out needs a folder" >&2; exit 2; }
           args+=("--out" "$(realpath -m -- "$2")"); shift 2 ;;
    --out=*) args+=("--out=$(realpath -m -- "${1#--out=}")"); shift ;;
    *) args+=("$1"); shift ;;
  esac
done
cd "$ROOT"  # run as a module from the repo root: prolora_dev and scripts import as packages
exec "$ROOT/.venv/bin/python" -m scripts.demo "${args[@]}"
