"""The DiT zoo (``zoo/dit/``: tiny Flux / Chroma from ComfyUI's classes) and its quick protocol.

``python -m evidence.dit_protocol --quick`` runs as a subprocess from the repo root on the shipped
zoo (style LoRA, LoRA seed 0, ``dit_finetune`` and ``dit_sibling``) and writes its raw results; the
test checks their shape and three things that can fail:

* Copy of a target's own trained LoRA onto itself closes the gap exactly (1 on the loss and in the
  domain): the engine's placement on ComfyUI's Flux key map (row slices of the fused weights), the
  loader's ΔW and the gap arithmetic agree;
* the fine-tune shares the source's subspaces (Φ median ≥ 0.8) and the sibling (same init, other
  data stream) falls clearly below it: what the zoo was trained for;
* on the fine-tune Copy closes part of the gap (> 0.05) and every projection mode gives a finite gap.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DIT = REPO_ROOT / "zoo" / "dit"
METHODS = ["copy", "subspace", "prolora", "prolora-full", "casa", "trained"]

pytestmark = pytest.mark.comfy


def test_dit_protocol_quick(tmp_path: Path) -> None:
    missing = [n for n in ("dit_source", "dit_finetune", "dit_sibling", "lora_style_dit_source_s0") if not (DIT / f"{n}.safetensors").is_file()]
    if missing:
        pytest.fail(f"zoo/dit lacks {missing}: run `python -m evidence.dit_zoo`", pytrace=False)
    out = tmp_path / "dit_quick.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "evidence.dit_protocol", "--quick", "--json", str(out)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())

    own = res["own_copy"]
    assert list(own) == ["style → dit_finetune"]
    for value in own["style → dit_finetune"]:
        assert value == pytest.approx(1.0, abs=1e-3), own

    phi = res["phi"]
    assert set(phi) == {"dit_finetune", "dit_sibling"} and all(p["modules"] > 20 for p in phi.values())
    assert phi["dit_finetune"]["median"] >= 0.8, phi["dit_finetune"]["median"]
    assert phi["dit_sibling"]["median"] < phi["dit_finetune"]["median"] - 0.1, (phi["dit_sibling"]["median"], phi["dit_finetune"]["median"])

    for target in ("dit_finetune", "dit_sibling"):
        rows = {r["method"]: r for r in res["rows"] if r["target"] == target and r["lora"] == "style"}
        assert list(rows) == METHODS, (target, list(rows))
        for m, r in rows.items():
            assert len(r["gap"]) == len(r["igap"]) == 1, r
            assert all(math.isfinite(v) for v in r["gap"] + r["igap"]), r
    assert res["rows"][0]["target"] == "dit_finetune" and res["rows"][0]["method"] == "copy"
    assert res["rows"][0]["gap"][0] > 0.05, res["rows"][0]
