#!/usr/bin/env bash
# The demo: sets up .venv and the ComfyUI host if needed, starts a real headless ComfyUI with the
# pack, runs example workflow (a) through the API, writes demo_output/grid.png and report.png, stops.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
exec "$ROOT/.venv/bin/python" "$ROOT/scripts/demo.py" "$@"
