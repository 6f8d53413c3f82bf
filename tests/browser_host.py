"""Driving Debian's Chromium against a real ComfyUI server (``tests/browser/drive.mjs`` through
playwright-core). Shared by the browser tests."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

import comfy_host

BROWSER_DIR = comfy_host.REPO_ROOT / "tests" / "browser"
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = comfy_host.REPO_ROOT / "artifacts"


def require_browser_tools() -> None:
    """Fail (not skip) with the commands to run when Chromium, Node or playwright-core is missing."""
    missing = []
    if not CHROMIUM.is_file():
        missing.append(f"{CHROMIUM} (apt-get install -y chromium)")
    if shutil.which("node") is None:
        missing.append("node >= 20 (apt-get install -y nodejs npm)")
    if not (BROWSER_DIR / "node_modules" / "playwright-core" / "package.json").is_file():
        missing.append(f"playwright-core in {BROWSER_DIR}/node_modules (npm ci --prefix tests/browser)")
    if missing:
        pytest.fail("browser test tools are missing: " + "; ".join(missing) + ". scripts/setup.sh installs them.", pytrace=False)



def drive(server: comfy_host.ComfyServer, workflow: dict[str, Any], tmp_path: Path, *, prompt_timeout_s: int = 120,
          match_panels: int = 1) -> dict[str, Any]:
    """Run ``tests/browser/drive.mjs`` on ``workflow`` (UI format) against ``server``; returns its result JSON."""
    require_browser_tools()
    config = {"url": server.url, "workflow": workflow, "user_data_dir": str(tmp_path / "chromium-profile"), "out_dir": str(ARTIFACTS),
              "executable": str(CHROMIUM), "timeout_s": prompt_timeout_s + 60, "prompt_timeout_s": prompt_timeout_s, "match_panels": match_panels}
    (tmp_path / "chromium-profile").mkdir()
    cfg_path = tmp_path / "drive.json"
    cfg_path.write_text(json.dumps(config))
    proc = subprocess.run(["node", str(BROWSER_DIR / "drive.mjs"), str(cfg_path)], capture_output=True, text=True, timeout=prompt_timeout_s + 120,
                          cwd=BROWSER_DIR)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, f"drive.mjs failed ({proc.returncode}):\n{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}"
    result = json.loads(lines[-1])
    assert "error" not in result, f"{result['error']}\nstderr:\n{proc.stderr[-3000:]}\nscreenshot: {result['screenshots']}"
    return result
