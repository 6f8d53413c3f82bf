#!/usr/bin/env bash
# The whole test suite: sets up .venv and the ComfyUI host if needed, then runs pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k cli). Exit code 5 (no tests ran) is an error.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh" || exit 1
cd "$ROOT"
"$ROOT/.venv/bin/python" -m pytest "$@"
rc=$?
if [[ $rc -eq 5 ]]; then
  echo "error: pytest collected no tests" >&2
fi
exit $rc
