"""Adapter formats beyond plain LoRA (LoCon Tucker, LoHa, LoKr, DoRA, full diffs and 1-D parts),
fp8/bf16 inputs, CUDA memory fallback, interrupts, determinism and the shared cache.

Every format is checked two ways, through real files and the CLI:

* target = source, mode ``prolora-full``: the output, applied by ComfyUI itself
  (``comfy.lora.load_lora`` + ``calculate_weight``), changes the weights exactly as the original
  file does (up to the reported dropped energy for re-factored LoHa/LoKr), and loads with no
  "lora key not loaded" warning;
* target ≠ source: against the dense float64 reference (tests/reference.py) on an independently
  formed ``ΔW`` (numpy), and DoRA against the ratio rule written out here.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fixtures_files import REPO_ROOT, decaying_weight, read_report, rel_err, run_main
from reference import reference_transfer

K = 4
EXACT = ["--basis-method", "exact", "--compute-dtype", "float64", "--subspace-rank", str(K)]
Q, FF, CONV, SKIP = "blocks.0.attn.to_q", "blocks.0.ff.net", "blocks.1.conv", "blocks.1.skip"
SHAPES: dict[str, tuple[int, ...]] = {Q: (24, 40), FF: (40, 24), CONV: (12, 6, 3, 3), SKIP: (16, 12, 1, 1)}
NORMS = ("norm_out", "norm_in")  # 1-D weights (8,)
EPS32 = float(torch.finfo(torch.float32).eps)
Tensor = torch.Tensor


# --------------------------------------------------------------------------------------
# Bases and LoRA files
# --------------------------------------------------------------------------------------

def write_bases(folder: Path, noise: float = 0.01, seed: int = 0) -> tuple[Path, Path, dict[str, Tensor], dict[str, Tensor]]:
    """Source and target files: the four matrix weights with biases, and two 1-D norm weights."""
    rng = np.random.default_rng(seed)
    ws: dict[str, np.ndarray] = {}
    for name, shape in SHAPES.items():
        ws[f"{name}.weight"] = decaying_weight(rng, shape)
        ws[f"{name}.bias"] = (0.1 * rng.standard_normal(shape[0])).astype(np.float32)
    for name in NORMS:
        ws[f"{name}.weight"] = (1 + 0.1 * rng.standard_normal(8)).astype(np.float32)
        ws[f"{name}.bias"] = (0.1 * rng.standard_normal(8)).astype(np.float32)
    wt = {k: (v + noise * rng.standard_normal(v.shape)).astype(np.float32) for k, v in ws.items()}
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "source.safetensors", folder / "target.safetensors"
    for path, w in zip(paths, (ws, wt)):
        save_file({k: torch.from_numpy(v) for k, v in w.items()}, str(path))
    return paths[0], paths[1], {k: torch.from_numpy(v) for k, v in ws.items()}, {k: torch.from_numpy(v) for k, v in wt.items()}


def _t(rng: np.random.Generator, *shape: int, scale: float = 0.3) -> Tensor:
    return torch.from_numpy((scale * rng.standard_normal(shape)).astype(np.float32))


def _lora(rng: np.random.Generator, name: str, r: int, alpha: float) -> dict[str, Tensor]:
    shape = SHAPES[name]
    if len(shape) == 4:
        up, down = _t(rng, shape[0], r, 1, 1), _t(rng, r, *shape[1:])
    else:
        up, down = _t(rng, shape[0], r), _t(rng, r, shape[1])
    return {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, f"{name}.alpha": torch.tensor(alpha)}


def _magnitude(rng: np.random.Generator, w: Tensor, output_axis: bool) -> Tensor:
    """A trained-looking DoRA magnitude: the weight's column norms, changed by ±10 %."""
    if output_axis:
        n = w.reshape(w.shape[0], -1).norm(dim=1)
        shape = (w.shape[0],) + (1,) * (w.ndim - 1)
    else:
        n = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)
        shape = (1, w.shape[1]) + (1,) * (w.ndim - 2)
    return (n * torch.from_numpy(1 + 0.1 * rng.standard_normal(n.shape[0]).astype(np.float32))).reshape(shape)


def make_format(fmt: str, ws: dict[str, Tensor], seed: int = 3) -> dict[str, Tensor]:
    """A LoRA file's tensors in format ``fmt`` on the bases' modules."""
    rng = np.random.default_rng(seed)
    t: dict[str, Tensor] = {}
    if fmt == "locon-tucker":
        t.update(_lora(rng, Q, 3, 2.0))
        t.update({f"{CONV}.lora_up.weight": _t(rng, 12, 3, 1, 1), f"{CONV}.lora_down.weight": _t(rng, 3, 6, 1, 1),
                  f"{CONV}.lora_mid.weight": _t(rng, 3, 3, 3, 3), f"{CONV}.alpha": torch.tensor(1.5)})
    elif fmt == "loha":
        for name, (m, n) in ((Q, (24, 40)), (CONV, (12, 54))):
            t.update({f"{name}.hada_w1_a": _t(rng, m, 2), f"{name}.hada_w1_b": _t(rng, 2, n), f"{name}.hada_w2_a": _t(rng, m, 2),
                      f"{name}.hada_w2_b": _t(rng, 2, n), f"{name}.alpha": torch.tensor(4.0)})
    elif fmt == "loha-tucker":  # CP cores on the 3×3 conv: w_a [r, out], w_b [r, in], t [r, r, kh, kw]; plain LoHa on to_q
        t.update({f"{CONV}.hada_w1_a": _t(rng, 2, 12), f"{CONV}.hada_w1_b": _t(rng, 2, 6), f"{CONV}.hada_t1": _t(rng, 2, 2, 3, 3),
                  f"{CONV}.hada_w2_a": _t(rng, 2, 12), f"{CONV}.hada_w2_b": _t(rng, 2, 6), f"{CONV}.hada_t2": _t(rng, 2, 2, 3, 3),
                  f"{CONV}.alpha": torch.tensor(1.0)})
        t.update({f"{Q}.hada_w1_a": _t(rng, 24, 2), f"{Q}.hada_w1_b": _t(rng, 2, 40), f"{Q}.hada_w2_a": _t(rng, 24, 2),
                  f"{Q}.hada_w2_b": _t(rng, 2, 40)})
    elif fmt == "lokr":
        t.update({f"{Q}.lokr_w1": _t(rng, 4, 5), f"{Q}.lokr_w2_a": _t(rng, 6, 2), f"{Q}.lokr_w2_b": _t(rng, 2, 8), f"{Q}.alpha": torch.tensor(3.0)})
        t.update({f"{FF}.lokr_w1_a": _t(rng, 4, 1), f"{FF}.lokr_w1_b": _t(rng, 1, 3), f"{FF}.lokr_w2": _t(rng, 10, 8), f"{FF}.alpha": torch.tensor(0.5)})
        t.update({f"{CONV}.lokr_w1": _t(rng, 2, 3), f"{CONV}.lokr_w2": _t(rng, 6, 2, 3, 3), f"{CONV}.alpha": torch.tensor(7.0)})
    elif fmt == "dora":
        t.update(_lora(rng, Q, 3, 2.0))
        t[f"{Q}.dora_scale"] = _magnitude(rng, ws[f"{Q}.weight"], output_axis=True)
        t.update(_lora(rng, SKIP, 2, 1.0))
        t[f"{SKIP}.dora_scale"] = _magnitude(rng, ws[f"{SKIP}.weight"], output_axis=False)
        t.update({f"{CONV}.hada_w1_a": _t(rng, 12, 2), f"{CONV}.hada_w1_b": _t(rng, 2, 54), f"{CONV}.hada_w2_a": _t(rng, 12, 2),
                  f"{CONV}.hada_w2_b": _t(rng, 2, 54), f"{CONV}.dora_scale": _magnitude(rng, ws[f"{CONV}.weight"], output_axis=True)})
    elif fmt == "diff":
        t.update({f"{Q}.diff": _t(rng, 24, 40, scale=0.05), f"{Q}.diff_b": _t(rng, 24), f"{CONV}.diff": _t(rng, 12, 6, 3, 3, scale=0.05)})
        t.update({"norm_out.w_norm": _t(rng, 8), "norm_out.b_norm": _t(rng, 8), "norm_in.diff": _t(rng, 8)})
    else:
        raise ValueError(fmt)
    return t


FORMATS = ["locon-tucker", "loha", "loha-tucker", "lokr", "dora", "diff"]
REFACTORED = {"loha", "loha-tucker", "lokr", "dora"}  # hold LoHa/LoKr modules: re-factored into LoRAs


def dense_update(t: dict[str, Tensor], name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The module's ``ΔW`` (m × n, float64), formed here from the format's definition (not the engine's code)."""
    g = {k[len(name) + 1:]: v.double().numpy() for k, v in t.items() if k.startswith(name + ".")}
    alpha = float(g["alpha"]) if "alpha" in g else None
    m = shape[0]

    def scale(rank: int) -> float:
        return alpha / rank if alpha is not None else 1.0

    if "diff" in g:
        return g["diff"].reshape(m, -1)
    if "lora_mid.weight" in g:  # ΔW[o, i, h, w] = Σ up[o, r] mid[r, j, h, w] down[j, i]
        up, mid, down = g["lora_up.weight"][:, :, 0, 0], g["lora_mid.weight"], g["lora_down.weight"][:, :, 0, 0]
        return scale(down.shape[0]) * np.einsum("or,rjhw,ji->oihw", up, mid, down).reshape(m, -1)
    if "lora_up.weight" in g:
        r = g["lora_down.weight"].shape[0]
        return scale(r) * g["lora_up.weight"].reshape(m, r) @ g["lora_down.weight"].reshape(r, -1)
    if "hada_t1" in g:  # m[p, r, k, l] = Σ t[i, j, k, l] b[j, r] a[i, p]
        m1, m2 = (np.einsum("ijkl,jr,ip->prkl", g[f"hada_t{i}"], g[f"hada_w{i}_b"], g[f"hada_w{i}_a"]) for i in (1, 2))
        return scale(g["hada_w1_b"].shape[0]) * (m1 * m2).reshape(m, -1)
    if "hada_w1_a" in g:
        return scale(g["hada_w1_b"].shape[0]) * (g["hada_w1_a"] @ g["hada_w1_b"]) * (g["hada_w2_a"] @ g["hada_w2_b"])
    w1 = g["lokr_w1"] if "lokr_w1" in g else g["lokr_w1_a"] @ g["lokr_w1_b"]
    w2 = g["lokr_w2"] if "lokr_w2" in g else g["lokr_w2_a"] @ g["lokr_w2_b"]
    dim = g["lokr_w2_b"].shape[0] if "lokr_w2_b" in g else g["lokr_w1_b"].shape[0] if "lokr_w1_b" in g else None
    scale = alpha / dim if alpha and dim else 1.0
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    return scale * np.kron(w1, w2).reshape(m, -1)


def read_all(path: Path) -> dict[str, Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# --------------------------------------------------------------------------------------
# ComfyUI as the judge
# --------------------------------------------------------------------------------------

def comfy_apply(lora: dict[str, Tensor], base: dict[str, Tensor], caplog: pytest.LogCaptureFixture) -> dict[str, Tensor]:
    """The weights ComfyUI computes for ``lora`` on ``base`` (only the keys it patches); fails on
    a "lora key not loaded" warning."""
    import comfy.lora

    key_map = {k[: -len(".weight")]: k for k in base if k.endswith(".weight")}
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(lora, key_map)
    missing = [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert not missing, missing
    return {key: comfy.lora.calculate_weight([(1.0, patch, 1.0, None, None)], base[key].float().clone(), key) for key, patch in patches.items()}


def transfer(tmp: Path, source: Path, target: Path, lora: dict[str, Tensor], capsys: pytest.CaptureFixture[str], *extra: str,
             name: str = "lora") -> tuple[dict[str, Tensor], dict]:
    lora_path, out, report = tmp / f"{name}.safetensors", tmp / f"{name}_out.safetensors", tmp / f"{name}_report.json"
    save_file(lora, str(lora_path))
    rc, _, err = run_main(["transfer", "--mode", "prolora-full", "--source-base", source, "--target-base", target, "--lora", lora_path, "--out", out,
                           "--report", report, "--no-cache", "--device", "cpu", *extra], capsys)
    assert rc == 0, err
    assert "warning" not in err, err
    return read_all(out), read_report(report)


def changes(after: dict[str, Tensor], base: dict[str, Tensor]) -> dict[str, np.ndarray]:
    return {k: (after[k].double() - base[k].double()).numpy() for k in after}


# --------------------------------------------------------------------------------------
# Each format, target = source and target ≠ source
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_target_equal_source_gives_what_comfyui_computes_for_the_original(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                          caplog: pytest.LogCaptureFixture, comfyui: Any, fmt: str) -> None:
    source, _, ws, _ = write_bases(tmp_path)
    lora = make_format(fmt, ws)
    out, report = transfer(tmp_path, source, source, lora, capsys, *EXACT, "--mode", "prolora-full")
    want = changes(comfy_apply(lora, ws, caplog), ws)
    got = changes(comfy_apply(out, ws, caplog), ws)
    assert set(got) == set(want)
    rows = {r["source"]: r for r in report["modules"]}
    for key, w in want.items():
        module = key.rsplit(".", 1)[0]
        row = rows[module]
        assert row["transferred"], row
        refactored = row["kind"] in ("loha", "lokr")
        dropped = 1.0 - row["energy_kept"] if refactored else 0.0
        assert dropped <= 1e-3
        if refactored and f"{module}.dora_scale" not in lora:
            # The change is ΔW itself: its error is exactly the energy the re-factoring dropped.
            assert rel_err(got[key], w) == pytest.approx(np.sqrt(dropped), abs=1e-5), key
        else:
            assert rel_err(got[key], w) <= np.sqrt(dropped) + 1e-5, key
    if fmt == "diff":
        for key in ("norm_out.w_norm", "norm_out.b_norm", "norm_in.diff", f"{Q}.diff_b"):
            assert torch.equal(out[key], lora[key]), "1-D parts are carried over unchanged"
        assert rows["norm_out"]["reason"] == rows["norm_in"]["reason"] == "carried over unchanged"
        assert rows["norm_out"]["similarity_u"] is None, "a module of 1-D parts needs no basis"
        assert report["summary"]["svd_computed"] == 2 * 2, "bases of the two matrix weights only (source and target)"


def _dora_rule(w_t: np.ndarray, delta_t: np.ndarray, m_s: np.ndarray, w_s: np.ndarray) -> np.ndarray:
    """ComfyUI's weight_decompose with the ratio rule's magnitude m_t = m_s ‖W_t‖ / ‖W_s‖, in float64."""
    out_axis = m_s.shape[0] == w_t.shape[0]

    def norms(w: np.ndarray) -> np.ndarray:
        if out_axis:
            return np.linalg.norm(w.reshape(w.shape[0], -1), axis=1).reshape(m_s.shape)
        return np.linalg.norm(np.swapaxes(w, 0, 1).reshape(w.shape[1], -1), axis=1).reshape(m_s.shape)

    m_t = m_s * norms(w_t) / norms(w_s)
    calc = w_t + delta_t
    return calc * m_t / (norms(w_t if out_axis else calc) + EPS32)


@pytest.mark.parametrize("mode", ["prolora-full", "prolora"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_target_other_than_source_matches_the_dense_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              caplog: pytest.LogCaptureFixture, comfyui: Any, fmt: str, mode: str) -> None:
    source, target, ws, wt = write_bases(tmp_path, noise=0.05)
    lora = make_format(fmt, ws)
    out, report = transfer(tmp_path, source, target, lora, capsys, *EXACT, "--mode", mode, "--threshold", "0", "--out-rank", "64")
    applied = comfy_apply(out, wt, caplog)
    rows = {r["source"]: r for r in report["modules"]}
    for name, shape in SHAPES.items():
        if not any(k.startswith(name + ".") and not k.endswith((".diff_b", ".alpha", ".dora_scale")) for k in lora):
            continue
        key = f"{name}.weight"
        want = reference_transfer(dense_update(lora, name, shape), ws[key].double().numpy().reshape(shape[0], -1),
                                  wt[key].double().numpy().reshape(shape[0], -1), K, mode).reshape(shape)
        if f"{name}.dora_scale" in lora:
            want = _dora_rule(wt[key].double().numpy(), want, lora[f"{name}.dora_scale"].double().numpy(), ws[key].double().numpy()) - wt[key].double().numpy()
        got = (applied[key].double() - wt[key].double()).numpy()
        assert rel_err(got, want) <= 1e-5, f"{fmt} {name}"
        assert rows[name]["transferred"] and rows[name]["transferred_norm"] > 0
        if rows[name]["kind"] in ("loha", "lokr"):
            assert rows[name]["energy_kept"] == pytest.approx(1.0, abs=1e-6), "--out-rank 64 keeps every singular value"
            assert out[f"{name}.lora_down.weight"].ndim == len(shape), "a conv weight gets LoCon conv factors"
    if fmt == "diff":
        assert torch.equal(applied["norm_out.weight"], wt["norm_out.weight"] + lora["norm_out.w_norm"])
        assert torch.equal(applied[f"{Q}.bias"], wt[f"{Q}.bias"] + lora[f"{Q}.diff_b"])


def test_refactor_rank_follows_the_energy_rule_and_out_rank(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source, target, ws, wt = write_bases(tmp_path, noise=0.05)
    lora = make_format("loha", ws)
    out, report = transfer(tmp_path, source, target, lora, capsys, *EXACT, "--threshold", "0")
    for name in (Q, CONV):
        s = np.linalg.svd(dense_update(lora, name, SHAPES[name]), compute_uv=False)  # the projection keeps ΔW's rank
        rank = out[f"{name}.lora_down.weight"].shape[0]
        assert rank <= int(np.sum(s > 1e-9 * s[0])), "never more than the update's rank"
        row = next(r for r in report["modules"] if r["source"] == name)
        assert row["energy_kept"] >= 0.999 and row["kind"] == "loha"
    assert 0 <= report["summary"]["loras"][str(tmp_path / "lora.safetensors")]["energy_dropped"] <= 1e-3
    out2, report2 = transfer(tmp_path, source, target, lora, capsys, *EXACT, "--threshold", "0", "--out-rank", "2", name="r2")
    kept = total = 0.0
    for name in (Q, CONV):
        assert out2[f"{name}.lora_down.weight"].shape[0] == 2
        projected = reference_transfer(dense_update(lora, name, SHAPES[name]), ws[f"{name}.weight"].double().numpy().reshape(SHAPES[name][0], -1),
                                       wt[f"{name}.weight"].double().numpy().reshape(SHAPES[name][0], -1), K, "prolora-full")
        s2 = np.linalg.svd(projected, compute_uv=False) ** 2
        row = next(r for r in report2["modules"] if r["source"] == name)
        assert row["energy_kept"] == pytest.approx(s2[:2].sum() / s2.sum(), rel=1e-5)
        kept, total = kept + s2[:2].sum(), total + s2.sum()
    summary = report2["summary"]["loras"][str(tmp_path / "r2.safetensors")]
    assert summary["energy_dropped"] == pytest.approx(1 - kept / total, rel=1e-4)
    assert summary["energy_kept"] == pytest.approx(1 - summary["energy_dropped"])


def test_copy_mode_writes_every_module_as_it_came(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source, target, ws, _ = write_bases(tmp_path)
    lora = {**make_format("lokr", ws), **{k: v for k, v in make_format("dora", ws).items() if k.startswith(SKIP)}}
    out, _ = transfer(tmp_path, source, target, lora, capsys, "--mode", "copy")
    assert set(out) == set(lora) and all(torch.equal(out[k], lora[k]) for k in lora if not k.endswith(".alpha"))


# --------------------------------------------------------------------------------------
# dtypes: bf16 LoRAs, fp8 bases
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("save", ["keep", "float32", "float16"])
def test_bf16_lora_is_computed_in_float32_and_saved_as_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str], save: str) -> None:
    source, target, ws, wt = write_bases(tmp_path, noise=0.05)
    lora = {k: v.to(torch.bfloat16) if not k.endswith(".alpha") else v for k, v in make_format("loha", ws).items()}
    lora.update({k: v.to(torch.bfloat16) for k, v in _lora(np.random.default_rng(5), FF, 2, 1.0).items() if not k.endswith(".alpha")})
    lora[f"{FF}.alpha"] = torch.tensor(1.0)
    out, _ = transfer(tmp_path, source, target, lora, capsys, *EXACT, "--threshold", "0", "--out-rank", "64", "--save-dtype", save)
    dtype = {"keep": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[save]
    assert {t.dtype for k, t in out.items() if not k.endswith(".alpha")} == {dtype}
    tol = {"keep": 1e-2, "float16": 2e-3, "float32": 1e-5}[save]
    for name in (Q, FF):
        r = out[f"{name}.lora_down.weight"].shape[0]
        got = float(out[f"{name}.alpha"]) / r * out[f"{name}.lora_up.weight"].double().reshape(-1, r) @ out[f"{name}.lora_down.weight"].double().reshape(r, -1)
        want = reference_transfer(dense_update(lora, name, SHAPES[name]), ws[f"{name}.weight"].double().numpy(),
                                  wt[f"{name}.weight"].double().numpy(), K, "prolora-full")
        assert rel_err(got.numpy(), want) <= tol, name


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_scaled_fp8_base_is_dequantized_for_the_basis(tmp_path: Path, capsys: pytest.CaptureFixture[str], fp8: torch.dtype) -> None:
    source, target, ws, wt = write_bases(tmp_path, noise=0.05)
    scale = torch.tensor(0.01, dtype=torch.float32)
    quant = {k: (v / scale).to(fp8) if k.endswith(".weight") and v.ndim >= 2 else v for k, v in wt.items()}
    scales = {k.removesuffix(".weight") + ".scale_weight": scale.clone() for k, v in wt.items() if k.endswith(".weight") and v.ndim >= 2}
    fp8_path, deq_path = tmp_path / "fp8.safetensors", tmp_path / "dequantized.safetensors"
    save_file({**quant, **scales, "scaled_fp8": torch.tensor([], dtype=fp8)}, str(fp8_path))
    save_file({k: v.float() * scale if v.dtype == fp8 else v for k, v in quant.items()}, str(deq_path))
    lora = make_format("locon-tucker", ws)
    a, _ = transfer(tmp_path, source, fp8_path, lora, capsys, "--threshold", "0", name="a")
    b, _ = transfer(tmp_path, source, deq_path, lora, capsys, "--threshold", "0", name="b")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), "the basis of W·scale_weight, as ComfyUI dequantizes it"


# --------------------------------------------------------------------------------------
# The nodes: every format through Compute Basis → Match Modules → Project LoRA → core loader
# --------------------------------------------------------------------------------------


def _run(nodes_by_id: dict[str, Any], node_id: str, **kwargs: Any) -> tuple:
    return tuple(nodes_by_id[node_id].execute(**kwargs).args)


def _tiny_lora(model: Any) -> dict[str, Tensor]:
    """LoHa, LoKr, DoRA, Tucker, diff and norm parts on the tiny SD1.5 UNet, kohya-named."""
    sd = model.model.state_dict()
    rng = np.random.default_rng(9)
    q, kk, proj, res, ff, norm = (f"input_blocks.1.{m}" for m in (
        "1.transformer_blocks.0.attn1.to_q", "1.transformer_blocks.0.attn2.to_k", "1.proj_in", "0.out_layers.3",
        "1.transformer_blocks.0.ff.net.2", "1.transformer_blocks.0.norm1"))

    def k(module: str) -> str:
        return "lora_unet_" + module.replace(".", "_")

    return {f"{k(q)}.hada_w1_a": _t(rng, 32, 2), f"{k(q)}.hada_w1_b": _t(rng, 2, 32), f"{k(q)}.hada_w2_a": _t(rng, 32, 2),
         f"{k(q)}.hada_w2_b": _t(rng, 2, 32), f"{k(q)}.alpha": torch.tensor(2.0),
         f"{k(kk)}.lokr_w1": _t(rng, 4, 4), f"{k(kk)}.lokr_w2_a": _t(rng, 8, 2), f"{k(kk)}.lokr_w2_b": _t(rng, 2, 8), f"{k(kk)}.alpha": torch.tensor(1.0),
         f"{k(proj)}.lora_up.weight": _t(rng, 32, 2, 1, 1), f"{k(proj)}.lora_down.weight": _t(rng, 2, 32, 1, 1),
         f"{k(proj)}.dora_scale": _magnitude(rng, sd[f"diffusion_model.{proj}.weight"], output_axis=True),
         f"{k(res)}.lora_up.weight": _t(rng, 32, 2, 1, 1), f"{k(res)}.lora_down.weight": _t(rng, 2, 32, 1, 1),
         f"{k(res)}.lora_mid.weight": _t(rng, 2, 2, 3, 3), f"{k(res)}.alpha": torch.tensor(1.0),
         f"{k(ff)}.diff": _t(rng, 32, 128, scale=0.01), f"{k(ff)}.diff_b": _t(rng, 32),
         f"{k(norm)}.w_norm": _t(rng, 32), f"{k(norm)}.b_norm": _t(rng, 32)}


def test_nodes_transfer_every_format_and_core_loader_applies_it(nodes_by_id: dict[str, Any], comfyui: Any, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    import comfy_host
    import folder_paths
    from comfy_extras.nodes_train import LoraModelLoader

    model = comfy_host.tiny_sd15_model(0)
    lora = _tiny_lora(model)
    (b,) = _run(nodes_by_id, "ProLoRAComputeBasis", model=model, clip=None, subspace_rank=0, device="cpu", use_cache=False)
    match, _ = _run(nodes_by_id, "ProLoRAMatchModules", source_basis=b, target_basis=b, lora=lora, threshold=0.8, pairing="name")
    out, report = _run(nodes_by_id, "ProLoRAProjectLoRA", lora=lora, match=match, mode="prolora-full", out_rank=0, rescale_to_source_norm=False)
    assert "6/6 modules transferred" in report, report
    caplog.set_level(logging.WARNING)
    (orig,) = LoraModelLoader.execute(model=model, lora=lora, strength_model=1.0).args
    (ours,) = LoraModelLoader.execute(model=model, lora=out, strength_model=1.0).args
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    base = comfy_host.unet_weights(model)
    want, got = comfy_host.unet_weights(orig, patched=True), comfy_host.unet_weights(ours, patched=True)
    touched = {k for k in base if not torch.equal(want[k], base[k])}
    assert touched == {k for k in base if not torch.equal(got[k], base[k])} and len(touched) == 8  # 6 weights + 2 biases
    for key in touched:
        refactored = key.endswith(("attn1.to_q.weight", "attn2.to_k.weight"))  # LoHa, LoKr: ≥ 99.9 % of the energy kept
        assert rel_err((got[key] - base[key]).double().numpy(), (want[key] - base[key]).double().numpy()) <= (0.032 if refactored else 1e-5), key
    (tmp_path / "loras").mkdir()
    folder_paths.add_model_folder_path("loras", str(tmp_path / "loras"), is_default=True)
    (name,) = _run(nodes_by_id, "ProLoRASaveLoRA", lora=out, filename="formats", key_format="as input", overwrite=False)
    with safe_open(str(tmp_path / "loras" / name), framework="pt") as f:
        assert all(key.startswith("lora_unet_") for key in f.keys()), "every part keeps the input's module names"


def test_interrupt_during_match_modules_leaves_a_valid_cache(nodes_by_id: dict[str, Any], comfyui: Any, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import comfy.model_management
    import comfy_host

    pack = comfy_host.load_pack()
    engine = sys.modules[pack.__name__ + ".prolora_core.match"]
    monkeypatch.setenv("PROLORA_CACHE_DIR", str(tmp_path / "cache"))
    model = comfy_host.tiny_sd15_model(0)
    lora = _tiny_lora(model)
    real, calls = engine.compute_bases, []

    def interrupting(*args: Any, **kwargs: Any) -> Any:  # bases are computed in batches of one shape
        out = real(*args, **kwargs)
        calls.append(len(out))
        if len(calls) == 2:
            comfy.model_management.interrupt_current_processing(True)  # as the UI's Cancel does
        return out

    monkeypatch.setattr(engine, "compute_bases", interrupting)
    (b,) = _run(nodes_by_id, "ProLoRAComputeBasis", model=model, clip=None, subspace_rank=0, device="cpu", use_cache=True)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        _run(nodes_by_id, "ProLoRAMatchModules", source_basis=b, target_basis=b, lora=lora, threshold=0.8, pairing="name")
    entries = sorted((tmp_path / "cache" / "bases").rglob("*"))
    files = [p for p in entries if p.is_file()]
    done = sum(calls)
    assert 2 <= done < 5 and len(calls) == 2  # interrupted between batches: the rest was never computed
    assert len(files) == done and all(p.suffix == ".safetensors" and not p.name.startswith(".") for p in files), files
    cache = engine.BasisCache(tmp_path / "cache", b.settings)
    for p in files:
        assert cache.load(p.stem, 1, _shape_of(p)) is not None, f"{p.name} is not a complete entry"
    monkeypatch.setattr(engine, "compute_bases", real)
    match, summary = _run(nodes_by_id, "ProLoRAMatchModules", source_basis=b, target_basis=b, lora=lora, threshold=0.8, pairing="name")
    # 5 weights need bases (source = target: one computation or cache load each); `done` were cached before the interrupt.
    assert f"bases computed: {5 - done}, from cache: {done}" in summary, summary
    out, report = _run(nodes_by_id, "ProLoRAProjectLoRA", lora=lora, match=match, mode="prolora-full", out_rank=0, rescale_to_source_norm=False)
    assert "6/6 modules transferred" in report


def _shape_of(entry: Path) -> tuple[int, ...]:
    import json

    with safe_open(str(entry), framework="pt") as f:
        return tuple(json.loads((f.metadata() or {})["info"])["shape"])


# --------------------------------------------------------------------------------------
# Determinism and the shared cache, through real subprocesses
# --------------------------------------------------------------------------------------

def _cli(argv: list[str | Path], threads: int = 1, cache: Path | None = None) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if cache is not None:
        env["PROLORA_CACHE_DIR"] = str(cache)
    return subprocess.Popen([sys.executable, "-m", "prolora_core", *map(str, argv)], cwd=REPO_ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait(*procs: subprocess.Popen[str]) -> None:
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err


def _big_bases(tmp: Path) -> tuple[Path, Path, dict[str, Tensor]]:
    """Weights large enough that BLAS and LAPACK split their work over threads."""
    rng = np.random.default_rng(4)
    ws = {"big.a.weight": torch.from_numpy(decaying_weight(rng, (192, 320), rate=0.97)),
          "big.b.weight": torch.from_numpy(decaying_weight(rng, (256, 160, 1, 1), rate=0.97))}
    wt = {k: v + 0.02 * torch.from_numpy(rng.standard_normal(v.shape).astype(np.float32)) for k, v in ws.items()}
    save_file(ws, str(tmp / "src.safetensors"))
    save_file(wt, str(tmp / "tgt.safetensors"))
    lora = {"big.a.lora_up.weight": _t(rng, 192, 8), "big.a.lora_down.weight": _t(rng, 8, 320),
            "big.b.hada_w1_a": _t(rng, 256, 4), "big.b.hada_w1_b": _t(rng, 4, 160), "big.b.hada_w2_a": _t(rng, 256, 4),
            "big.b.hada_w2_b": _t(rng, 4, 160), "big.b.alpha": torch.tensor(4.0)}
    save_file(lora, str(tmp / "lora.safetensors"))
    return tmp / "src.safetensors", tmp / "tgt.safetensors", ws


def test_deterministic_flag_gives_the_same_bytes_on_1_and_2_threads(tmp_path: Path) -> None:
    src, tgt, _ = _big_bases(tmp_path)
    common = ["transfer", "--mode", "prolora-full", "--source-base", src, "--target-base", tgt, "--lora", tmp_path / "lora.safetensors", "--no-cache",
              "--device", "cpu", "--threshold", "0", "--deterministic"]
    one, two = tmp_path / "t1.safetensors", tmp_path / "t2.safetensors"
    _wait(_cli([*common, "--out", one], threads=1), _cli([*common, "--out", two], threads=2))
    assert one.read_bytes() == two.read_bytes()
    with safe_open(str(one), framework="pt") as f:
        meta = f.metadata()
    assert meta["prolora.deterministic"] == "true" and meta["prolora.basis"].endswith("-det") and meta["prolora.device"] == "cpu"
    assert not any(str(tmp_path) in v for v in meta.values()), "no absolute paths in the metadata"


def test_two_processes_share_one_cache(tmp_path: Path) -> None:
    """Same inputs in two concurrent processes on one cache folder: byte-identical, correct
    outputs (run-to-run determinism) and a cache whose every entry is complete."""
    from prolora_core.basis import BasisSettings
    from prolora_core.cache import BasisCache

    src, tgt, ws = _big_bases(tmp_path)
    cache = tmp_path / "cache"
    common = ["transfer", "--mode", "prolora-full", "--source-base", src, "--target-base", tgt, "--lora", tmp_path / "lora.safetensors", "--device", "cpu",
              "--threshold", "0", "--mode", "prolora-full", "--basis-method", "exact"]
    outs = [tmp_path / f"p{i}.safetensors" for i in range(2)]
    _wait(*[_cli([*common, "--out", out], cache=cache) for out in outs])
    assert outs[0].read_bytes() == outs[1].read_bytes()
    entries = sorted((cache / "bases").rglob("*.safetensors"))
    assert len(entries) == 4 and not [p for p in cache.rglob("*") if p.name.startswith(".")], "no temporary files left"
    store = BasisCache(cache, BasisSettings(method="exact"))
    for p in entries:
        assert store.load(p.stem, 1, _shape_of(p)) is not None, p
    third = tmp_path / "p2.safetensors"
    proc = _cli([*common, "--out", third, "--report", tmp_path / "r.json"], cache=cache)
    _wait(proc)
    assert read_report(tmp_path / "r.json")["summary"]["svd_computed"] == 0
    assert third.read_bytes() == outs[0].read_bytes(), "a warm run gives the same bytes"
    out = read_all(outs[0])
    k = min(64, min(192, 320) // 4)
    lora = read_all(tmp_path / "lora.safetensors")
    wt = read_all(tgt)
    want = reference_transfer(dense_update(lora, "big.a", (192, 320)), ws["big.a.weight"].double().numpy(), wt["big.a.weight"].double().numpy(), k, "prolora-full")
    got = out["big.a.lora_up.weight"].double() @ out["big.a.lora_down.weight"].double() * float(out["big.a.alpha"]) / 8
    assert rel_err(got.numpy(), want) <= 1e-4


def test_cache_max_mb_evicts_the_least_recently_used_bases(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source, target, ws, _ = write_bases(tmp_path)
    cache = tmp_path / "cache"
    loha = make_format("loha", ws)  # on Q and CONV
    save_file(loha, str(tmp_path / "both.safetensors"))
    save_file({k: v for k, v in loha.items() if k.startswith(Q)}, str(tmp_path / "q.safetensors"))
    base = ["transfer", "--mode", "prolora-full", "--source-base", source, "--target-base", target, "--cache-dir", cache, "--device", "cpu"]
    rc, _, err = run_main([*base, "--lora", tmp_path / "both.safetensors", "--out", tmp_path / "a.safetensors"], capsys)
    assert rc == 0, err
    entries = {p: _shape_of(p) for p in (cache / "bases").rglob("*.safetensors")}
    assert sorted(entries.values()) == [SHAPES[CONV]] * 2 + [SHAPES[Q]] * 2
    for p in entries:
        os.utime(p, ns=(10**9, 10**9))  # all last used long ago
    q_bytes = sum(p.stat().st_size for p, shape in entries.items() if shape == SHAPES[Q])
    rc, _, err = run_main([*base, "--lora", tmp_path / "q.safetensors", "--out", tmp_path / "b.safetensors", "--cache-max-mb", str(q_bytes / 2**20)], capsys)
    assert rc == 0 and "removed the 2 least recently used bases" in err, err
    assert sorted(_shape_of(p) for p in (cache / "bases").rglob("*.safetensors")) == [SHAPES[Q]] * 2, "the bases this run used stay"
    rc, _, err = run_main([*base, "--lora", tmp_path / "both.safetensors", "--out", tmp_path / "c.safetensors", "--cache-max-mb", "0"], capsys)
    assert rc == 0 and not list((cache / "bases").rglob("*.safetensors"))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "c.safetensors").read_bytes()


# --------------------------------------------------------------------------------------
# CUDA out of memory: the module falls back to the CPU (needs a GPU)
# --------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_out_of_memory_falls_back_to_cpu_per_module(caplog: pytest.LogCaptureFixture) -> None:
    from prolora_core import Planned, TransferConfig, parse_state_dict
    from prolora_core.transfer import match_modules, project_loras

    class Mem:
        label = "mem"

        def __init__(self, w: dict[str, Tensor]) -> None:
            self.w = w

        def keys(self) -> list[str]:
            return list(self.w)

        def shape(self, key: str) -> tuple[int, ...]:
            return tuple(self.w[key].shape)

        def get(self, key: str) -> Tensor:
            return self.w[key]

        def content_key(self, key: str) -> str:
            return key

    gen = torch.Generator().manual_seed(0)

    def spectral(m: int, n: int) -> Tensor:  # σ_i = 0.9^i over 128 directions: well-separated top-k subspaces
        return (torch.randn(m, 128, generator=gen) * 0.9 ** torch.arange(128.0)) @ torch.randn(128, n, generator=gen) / n**0.5

    ws = {"a.weight": spectral(8192, 8192), "b.weight": spectral(1024, 3072)}
    wt = {k: v + 1e-3 * spectral(*v.shape) for k, v in ws.items()}
    lora = parse_state_dict({"a.lora_up.weight": torch.randn(8192, 4, generator=gen), "a.lora_down.weight": torch.randn(4, 8192, generator=gen),
                             "b.hada_w1_a": torch.randn(1024, 2, generator=gen), "b.hada_w1_b": torch.randn(2, 3072, generator=gen),
                             "b.hada_w2_a": torch.randn(1024, 2, generator=gen), "b.hada_w2_b": torch.randn(2, 3072, generator=gen)})
    plan = [Planned(0, m, f"{m.name}.weight") for m in lora.modules.values()]
    config = TransferConfig(device="cuda", threshold=0.0, out_rank=8)
    caplog.set_level(logging.WARNING, logger="prolora")
    total = torch.cuda.get_device_properties(0).total_memory

    def limit(extra_mib: int) -> None:  # what this process holds now, plus extra_mib
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + extra_mib * 2**20) / total)

    try:
        limit(128)  # a (256 MiB) cannot go to the GPU, b (12 MiB) can
        matches, _ = match_modules(["a.weight", "b.weight"], Mem(ws), Mem(wt), config)
        assert matches["a.weight"].source_basis.U.device.type == "cpu" and matches["b.weight"].source_basis.U.device.type == "cuda"
        limit(6)  # b's dense 1024×3072 ΔW (12 MiB) no longer fits
        (res,) = project_loras([lora], plan, matches, config)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    messages = [r.getMessage() for r in caplog.records]
    assert any("out of GPU memory in the basis of a.weight" in m for m in messages), messages
    assert any("out of GPU memory in the projection of b" in m for m in messages), messages
    assert all(m.transferred for m in res.modules)
    cpu_matches, _ = match_modules(["a.weight", "b.weight"], Mem(ws), Mem(wt), TransferConfig(device="cpu", threshold=0.0, out_rank=8))
    (cpu,) = project_loras([lora], plan, cpu_matches, TransferConfig(device="cpu", threshold=0.0, out_rank=8))
    for key, t in cpu.tensors.items():
        if key.endswith(".lora_up.weight"):
            name = key.removesuffix(".lora_up.weight")
            dense = lambda r: (r[f"{name}.lora_up.weight"].double() @ r[f"{name}.lora_down.weight"].double())  # noqa: E731
            assert rel_err(dense(res.tensors).numpy(), dense(cpu.tensors).numpy()) <= 1e-3, name


def test_mps_bases_are_computed_on_the_cpu() -> None:
    """MPS lacks QR and SVD: compute_basis runs them on the CPU and moves the result (checked with
    the device check itself, as no MPS device is here)."""
    from prolora_core.linalg import linalg_device

    assert linalg_device(torch.device("mps")) == torch.device("cpu")
    assert linalg_device(torch.device("cpu")) == torch.device("cpu")
    if torch.cuda.is_available():
        assert linalg_device(torch.device("cuda:0")) == torch.device("cuda:0")

