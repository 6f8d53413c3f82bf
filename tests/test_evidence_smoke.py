"""Smoke test of the evidence package on the shipped zoo (``zoo/``): no training, seconds.

* ``python -m evidence.protocol --quick`` runs as a subprocess from the repo root (the way the
  docs say to run it, so the ``sys.path`` fix in ``evidence/__init__.py`` is exercised: the pack's
  ``nodes/`` must not shadow ComfyUI's ``nodes``) and prints a table with the expected rows and
  finite numbers.
* Zoo models load as real ComfyUI MODELs and sample finite latents through the stock KSampler,
  with and without a zoo LoRA applied by ComfyUI's own LoRA loader.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
ZOO = REPO_ROOT / "zoo"
METHODS = ("no LoRA", "copy", "subspace", "prolora", "prolora-full", "casa", "auto", "trained")

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


def test_pruned_descendant_b_needs_similarity_pairing(nodes_by_id: dict, comfyui) -> None:
    """Descendant B (zoo): pruned like SSD-1B, two blocks renumbered, distilled from the source.

    Through the pack's own nodes: name pairing finds no target for the removed blocks and compares
    the renumbered ones with the wrong weights (Φ near chance: filtered); similarity pairing sends
    each renumbered block's LoRA update to its new name with Φ above the threshold, and ComfyUI's
    LoRA loader applies the result to B with every key loaded."""
    import logging

    from comfy_extras.nodes_train import LoraModelLoader

    def run(node_id: str, **kw):
        return tuple(nodes_by_id[node_id].execute(**kw).args)

    src, tgt, lora, _ = run("ProLoRADemoModels", target="descendant B, pruned + distilled", lora="style")
    (bs,) = run("ProLoRAComputeBasis", model=src, clip=None, subspace_rank=0, device="cpu", use_cache=False)
    (bt,) = run("ProLoRAComputeBasis", model=tgt, clip=None, subspace_rank=0, device="cpu", use_cache=False)
    renumbered = {"output_blocks.1.1.transformer_blocks.0.": "output_blocks.1.1.transformer_blocks.1.",
                  "output_blocks.0.1.transformer_blocks.0.": "output_blocks.1.1.transformer_blocks.0."}
    removed = ("middle_block.1.", "output_blocks.0.1.")

    by_name, _ = run("ProLoRAMatchModules", source_basis=bs, target_basis=bt, lora=lora, threshold=0.8, pairing="name")
    rows = by_name.rows()
    assert len(rows) == 84
    lost = [r for r in rows if r["target"] is None]
    # the mid-block transformer (12 modules) and output_blocks.0.1 (12) are gone from B
    assert len(lost) == 24 and all(any(p in r["source"] for p in removed) for r in lost)
    wrong = [r for r in rows if "output_blocks.1.1.transformer_blocks.0." in r["source"]]
    assert len(wrong) == 10 and not any(r["passes"] for r in wrong)  # same name, another block's weights

    by_sim, summary = run("ProLoRAMatchModules", source_basis=bs, target_basis=bt, lora=lora, threshold=0.8, pairing="similarity")
    rows = {r["source"]: r for r in by_sim.rows()}
    moved = {s: (r, s.replace(old, new)) for s, r in rows.items() for old, new in renumbered.items() if old in s}
    assert len(moved) == 20  # attn1/attn2 q, k, v, out and ff in/out of both blocks
    for s, (r, expected) in moved.items():
        assert r["target"] == expected, (s, r["target"])
        assert r["repaired"] and r["passes"] and min(r["phi_u"], r["phi_v"]) >= 0.8, r
    kept = [r for s, r in rows.items() if s not in moved and not any(p in s for p in removed)]
    assert len(kept) == 50 and all(r["target"] == r["source"] and r["passes"] for r in kept)
    assert f"{sum(r['repaired'] and r['passes'] for r in rows.values())} re-paired by similarity" in summary  # among those that pass

    out, _ = run("ProLoRAProjectLoRA", lora=lora, match=by_sim, mode="prolora-full", out_rank=0, rescale_to_source_norm=False)
    new_block = "output_blocks.1.1.transformer_blocks.1."
    assert any(new_block in k for k in out)
    before = {k: v.clone() for k, v in tgt.model.diffusion_model.state_dict().items()}
    records: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Grab()
    logging.getLogger().addHandler(handler)
    try:
        (patched,) = LoraModelLoader.execute(model=tgt, lora=out, strength_model=1.0).args
        patched.patch_model()
        after = {k: v.clone() for k, v in patched.model.diffusion_model.state_dict().items()}
        patched.unpatch_model()
    finally:
        logging.getLogger().removeHandler(handler)
    assert not [m for m in records if "not loaded" in m], records
    assert not torch.equal(after[new_block + "attn1.to_q.weight"], before[new_block + "attn1.to_q.weight"])


def test_turbo_scoring_in_its_own_few_step_sampling(comfyui) -> None:
    """The turbo target (zoo): the style LoRA trained on the source, copied through the engine onto the
    few-step student and sampled with the turbo's own schedule (KSampler euler, sgm_uniform, 4 steps,
    cfg 1), raises the stripe score above the turbo alone; gap closed is that gain over the gain on
    the source in the full schedule, per seed, and it is finite and positive."""
    if not (ZOO / "turbo.safetensors").is_file():
        pytest.fail("zoo/ lacks turbo: run `python -m evidence.build_zoo --only turbo`", pytrace=False)
    import safetensors

    import evidence  # noqa: F401
    from evidence.build_zoo import TURBO_SAMPLING
    from evidence.protocol import Zoo
    from evidence.turbo import score_lora

    with safetensors.safe_open(str(ZOO / "turbo.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["prolora.zoo.sampling"]) == TURBO_SAMPLING and meta["prolora.zoo.parent"] == "source"
    assert TURBO_SAMPLING["steps"] <= 4

    rows = {r["method"]: r for r in score_lora(Zoo(ZOO), "style", [0], 6, methods=("no LoRA", "copy"))}
    no, copy = rows["no LoRA"], rows["copy"]
    assert copy["ref_gain"][0] > 0  # the LoRA shows on the source in the full schedule
    assert copy["det"][0] > no["det"][0], (copy["det"], no["det"])
    assert math.isfinite(copy["gap"][0]) and copy["gap"][0] > 0
    assert no["gap"][0] == 0.0 and copy["moved"] == "84/84"
    # the student really is few-step: in 4 steps at cfg 1 it is closer to the source's 15-step cfg-2
    # samples than the source itself sampled the same way
    assert no["mse_turbo_src"][0] < no["mse_fewstep_src"][0], (no["mse_turbo_src"], no["mse_fewstep_src"])
