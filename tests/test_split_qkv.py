"""kohya ``split_qkv`` Flux LoRAs: q, k, v (single blocks: q, k, v, ``proj_mlp``) trained apart and
saved as one module on the fused weight, ``down`` ``[B·r, in]`` stacked and ``up`` ``[rows, B·r]``
block-diagonal (``img_attn.qkv``: 3 blocks, ``linear1``: 4), alpha over the whole rank B·r.

Through the nodes on the tiny Flux (ComfyUI's own ``supported_models.Flux``) and through the CLI on
plain files: each block is projected with the bases of its own rows of the fused weight and written
back block-diagonal (every output column non-zero in one block's rows only: the zeros are kept).
Checked: ``copy`` applied by ComfyUI changes the weights as the input does; ``prolora-full`` at
target = source gives the input's change back; on a perturbed target each block's rows match the
dense float64 reference (tests/reference.py) computed with that block's rows as the weight.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import comfy_host
from fixtures_files import decaying_weight, read_report, run_main
from reference import reference_transfer
from test_family_flux import applied, default_k, no_key_warnings, places, transfer

H = comfy_host.FLUX_UNET_CONFIG["hidden_size"]
#: kohya module → its blocks' row counts (q, k, v; linear1 also proj_mlp, mlp_ratio · h rows)
SPLIT = {
    "lora_unet_double_blocks_0_img_attn_qkv": [H, H, H],
    "lora_unet_double_blocks_0_txt_attn_qkv": [H, H, H],
    "lora_unet_single_blocks_0_linear1": [H, H, H, 4 * H],
}
R, ALPHA = 4, 8.0
Blocks = dict[str, list[tuple[slice, np.ndarray]]]  # module → (its rows, its ΔW in float64) per block


def make_split(rows_per_block: dict[str, list[int]], n: int, seed: int, scale: float = 0.1) -> tuple[dict[str, torch.Tensor], Blocks]:
    """Block-diagonal kohya modules (rank R per block, alpha over B·R) and each block's ΔW."""
    gen = torch.Generator().manual_seed(seed)
    lora: dict[str, torch.Tensor] = {}
    blocks: Blocks = {}
    for name, sizes in rows_per_block.items():
        ups = [scale * torch.randn(m, R, generator=gen) for m in sizes]
        downs = [scale * torch.randn(R, n, generator=gen) for _ in sizes]
        lora[f"{name}.lora_up.weight"] = torch.block_diag(*ups)
        lora[f"{name}.lora_down.weight"] = torch.cat(downs)
        lora[f"{name}.alpha"] = torch.tensor(ALPHA)
        s, start = ALPHA / (R * len(sizes)), 0
        blocks[name] = []
        for m, up, down in zip(sizes, ups, downs):
            blocks[name].append((slice(start, start + m), s * (up.double().numpy() @ down.double().numpy())))
            start += m
    return lora, blocks


def assert_block_diagonal(up: torch.Tensor, sizes: list[int]) -> None:
    """Every column of ``up`` is non-zero in the rows of one block only (exact zeros elsewhere)."""
    bounds = np.cumsum([0, *sizes])
    assert up.shape[0] == bounds[-1]
    nz = (up != 0).numpy()
    for j in range(up.shape[1]):
        hit = [b for b in range(len(sizes)) if nz[bounds[b]:bounds[b + 1], j].any()]
        assert len(hit) == 1, f"column {j} spans blocks {hit}"


@pytest.fixture(scope="module")
def flux_pair(comfyui: Any) -> tuple[Any, Any]:
    src = comfy_host.tiny_flux_model(0)
    return src, comfy_host.perturbed_copy(src, 0.05, seed=11)


def test_copy_applies_as_the_input_and_keeps_the_blocks(nodes_by_id: dict[str, Any], flux_pair: tuple[Any, Any],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    src, tgt = flux_pair
    lora, _ = make_split(SPLIT, H, seed=1)
    out, _, report = transfer(nodes_by_id, src, tgt, lora, "copy")
    for name, sizes in SPLIT.items():
        up = out[f"{name}.lora_up.weight"]
        assert tuple(up.shape) == (sum(sizes), R * len(sizes)), "copy keeps each block's rank"
        assert_block_diagonal(up, sizes)
    with caplog.at_level(logging.WARNING):
        want, got = applied(tgt, lora), applied(tgt, out)
    no_key_warnings(caplog)
    before = comfy_host.unet_weights(tgt)
    changed = {k for k in before if not torch.equal(before[k], want[k])}
    assert changed == {k for k in before if not torch.equal(before[k], got[k])} and len(changed) == len(SPLIT)
    for k in changed:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)


def test_target_equal_to_source_gives_the_input_back(nodes_by_id: dict[str, Any], flux_pair: tuple[Any, Any]) -> None:
    src, _ = flux_pair
    lora, _ = make_split(SPLIT, H, seed=2)
    out, _, _ = transfer(nodes_by_id, src, src, lora, "prolora-full")
    comfy_host.assert_same_change(comfy_host.unet_weights(src), applied(src, lora), applied(src, out))


@pytest.mark.parametrize("mode", ["prolora-full", "prolora", "subspace"])
def test_each_block_matches_the_dense_reference_with_its_own_rows(nodes_by_id: dict[str, Any], flux_pair: tuple[Any, Any], mode: str) -> None:
    src, tgt = flux_pair
    lora, blocks = make_split(SPLIT, H, seed=3)
    out, _, report = transfer(nodes_by_id, src, tgt, lora, mode)
    before, after, src_sd = comfy_host.unet_weights(tgt), applied(tgt, out), comfy_host.unet_weights(src)
    for name, sizes in SPLIT.items():
        assert_block_diagonal(out[f"{name}.lora_up.weight"], sizes)
        key = places(src)[name][0]
        ws, wt = src_sd[key].double().numpy(), before[key].double().numpy()
        got = (after[key] - before[key]).double().numpy()
        for rows, delta in blocks[name]:
            expected = reference_transfer(delta, ws[rows], wt[rows], default_k(*delta.shape), mode)
            assert np.linalg.norm(got[rows] - expected) <= 1e-4 * np.linalg.norm(expected), (name, rows, mode)


def test_cli_keeps_the_blocks_on_plain_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same through the CLI (``transfer()``, name pairing on ``<module>.weight`` files)."""
    rng = np.random.default_rng(0)
    sizes = {"blocks.0.attn.qkv": [16, 16, 16], "blocks.0.linear1": [16, 16, 16, 40]}
    ws = {f"{m}.weight": decaying_weight(rng, (sum(s), 16)) for m, s in sizes.items()}
    wt = {k: (v + 0.02 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in ws.items()}
    paths = [tmp_path / f"{n}.safetensors" for n in ("source", "target", "lora", "out")]
    for path, w in zip(paths, (ws, wt)):
        save_file({k: torch.from_numpy(v) for k, v in w.items()}, str(path))
    lora, blocks = make_split(sizes, 16, seed=4)
    save_file(lora, str(paths[2]))
    rc, _, err = run_main(["transfer", "--source-base", paths[0], "--target-base", paths[1], "--lora", paths[2], "--out", paths[3],
                           "--report", tmp_path / "report.json", "--no-cache", "--device", "cpu", "--basis-method", "exact",
                           "--compute-dtype", "float64", "--subspace-rank", "4", "--mode", "prolora"], capsys)
    assert rc == 0, err
    out = load_file(str(paths[3]))
    rows_reported = [m for m in read_report(tmp_path / "report.json")["modules"] if m["source"] == "blocks.0.linear1"]
    want_keys = [f"blocks.0.linear1.weight[0:{a}:{b}]" for a, b in ((0, 16), (16, 16), (32, 16), (48, 40))]
    assert sorted(m["source_key"] for m in rows_reported) == want_keys, "one report row per block, each on its rows"
    for name, s in sizes.items():
        up, down, alpha = out[f"{name}.lora_up.weight"], out[f"{name}.lora_down.weight"], float(out[f"{name}.alpha"])
        assert_block_diagonal(up, s)
        got = alpha / down.shape[0] * (up.double() @ down.double()).numpy()
        for rows, delta in blocks[name]:
            w_s, w_t = (w[f"{name}.weight"][rows].astype(np.float64) for w in (ws, wt))
            expected = reference_transfer(delta, w_s, w_t, 4, "prolora")
            assert np.linalg.norm(got[rows] - expected) <= 1e-5 * np.linalg.norm(expected), (name, rows)


def test_casa_at_target_equal_to_source_gives_each_block_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Mode casa reads each block's rows of the source and target weights: at target = source it
    leaves ``ΔW`` as it is (tests/test_casa.py), so each block comes back at its own rank, and the
    output stays block-diagonal."""
    rng = np.random.default_rng(1)
    sizes = {"blocks.0.linear1": [16, 16, 16, 40]}
    ws = {f"{m}.weight": decaying_weight(rng, (sum(s), 16)) for m, s in sizes.items()}
    base, lora_path, out_path = tmp_path / "base.safetensors", tmp_path / "lora.safetensors", tmp_path / "out.safetensors"
    save_file({k: torch.from_numpy(v) for k, v in ws.items()}, str(base))
    lora, blocks = make_split(sizes, 16, seed=5)
    save_file(lora, str(lora_path))
    rc, _, err = run_main(["transfer", "--source-base", base, "--target-base", base, "--lora", lora_path, "--out", out_path,
                           "--no-cache", "--device", "cpu", "--mode", "casa"], capsys)
    assert rc == 0, err
    out = load_file(str(out_path))
    up, down, alpha = out["blocks.0.linear1.lora_up.weight"], out["blocks.0.linear1.lora_down.weight"], float(out["blocks.0.linear1.alpha"])
    assert_block_diagonal(up, sizes["blocks.0.linear1"])
    assert up.shape[1] == R * 4, "each block at its own rank"
    got = alpha / down.shape[0] * (up.double() @ down.double()).numpy()
    for rows, delta in blocks["blocks.0.linear1"]:
        assert np.linalg.norm(got[rows] - delta) <= 1e-5 * np.linalg.norm(delta), rows
