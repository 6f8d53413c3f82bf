"""Smoke test of the evidence package on the shipped zoo (``zoo/``): no training, seconds.

* ``python -m evidence.protocol --quick`` runs as a subprocess from the repo root (the way the
  docs say to run it, so the ``sys.path`` fix in ``evidence/__init__.py`` is exercised: the pack's
  ``nodes/`` must not shadow ComfyUI's ``nodes``) and prints a table with the expected rows and
  finite numbers.
* Zoo models load as real ComfyUI MODELs and sample finite latents through the stock KSampler,
  with and without a zoo LoRA applied by ComfyUI's own LoRA loader.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
ZOO = REPO_ROOT / "zoo"
METHODS = ("no LoRA", "copy", "subspace", "prolora", "prolora-full", "trained")

pytestmark = pytest.mark.comfy


def _require_zoo() -> None:
    missing = [n for n in ("source", "descendant_a", "unrelated_c") if not (ZOO / f"{n}.safetensors").is_file()]
    if missing:
        pytest.fail(f"zoo/ lacks {missing}: run `python -m evidence.build_zoo`", pytrace=False)


def test_protocol_quick_table() -> None:
    _require_zoo()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "evidence.protocol", "--quick"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    for target in ("descendant_a", "unrelated_c"):
        section = out.split(f"#### style LoRA → {target}\n", 1)
        assert len(section) == 2, f"no table for {target}:\n{out}"
        rows = {}
        for line in section[1].splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if line.startswith("| ") and cells[0] in METHODS:
                rows[cells[0]] = cells
            elif rows and not line.startswith("|") and line.strip():
                break
        assert list(rows) == list(METHODS), f"{target}: rows {list(rows)}"
        for method, cells in rows.items():
            loss = float(cells[1].split()[0])
            assert math.isfinite(loss) and loss > 0, (target, method, cells)
            for c in cells[3:8]:  # MSE, detector, bg, Δcopy, norm
                assert math.isfinite(float(c.split()[0])), (target, method, cells)
        if target == "descendant_a":  # a descendant shares the source's subspaces: the filter lets modules through
            assert rows["prolora"][8].split("/")[0] != "0", rows["prolora"]


def test_zoo_models_sample_in_comfyui(comfyui) -> None:
    _require_zoo()
    import safetensors.torch

    import evidence  # noqa: F401  (no-op sys.path set-up: conftest already configured ComfyUI)
    from evidence.build_zoo import ksample, load_conditioning, with_lora
    from evidence.models import load_zoo_model

    import comfy.model_patcher

    table = load_conditioning(ZOO)
    for name in ("source", "descendant_a", "unrelated_c"):
        patcher = load_zoo_model(ZOO / f"{name}.safetensors")
        assert isinstance(patcher, comfy.model_patcher.ModelPatcher)
        imgs = ksample(patcher, 0, 2, seed=0, steps=4, table=table)
        assert imgs.shape == (2, 3, 8, 8) and bool(torch.isfinite(imgs).all())
    lora = safetensors.torch.load_file(str(ZOO / "lora_style_source.safetensors"))
    styled = with_lora(load_zoo_model(ZOO / "source.safetensors"), lora)
    assert len(styled.patches) == len([k for k in lora if k.endswith(".lora_down.weight")])  # every module applied
    imgs = ksample(styled, 1, 2, seed=0, steps=4, table=table)
    assert bool(torch.isfinite(imgs).all())
