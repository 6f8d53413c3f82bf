"""Mode ``casa`` (cluster-aware spectral arbitration, prolora_core/casa.py) against an independent
dense float64 reference written plainly below: full SVDs with complete orthogonal U and V (m × m,
n × n), scipy's connected components, explicit masks and loops. Checked on its own, at target =
source, for its rank / energy report, through the CLI on real safetensors files and through the
Project LoRA node in the real ComfyUI host (applied by core ComfyUI's LoRA loader)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy.sparse.csgraph import connected_components

from fixtures_files import lora_name, make_bases, make_updates, matrix, read_metadata, read_output, read_report, rel_err, run_main, write_lora

import comfy_host


def reference_casa(delta: np.ndarray, ws: np.ndarray, wt: np.ndarray, energy: float = 0.9, tau: float = 0.5, rho: float = 0.5,
                   arbitrate_q: float = 0.85) -> tuple[np.ndarray, dict[str, int]]:
    """Dense float64 CASA (``m × n``, before re-compression) and what it found.

    Coordinates in the complete source bases: ``C = Uᵀ X V`` is ``m × n``; only its leading
    ``d × d`` block has singular values. Protected entries: row in an output-dense group or column
    in an input-dense group (rows / columns beyond the top k are never dense); arbitration only in
    the ``d × d`` block."""
    delta, ws, wt = (np.asarray(a, dtype=np.float64) for a in (delta, ws, wt))
    m, n = delta.shape
    d = min(m, n)
    U, s, Vt = np.linalg.svd(ws, full_matrices=True)
    V = Vt.T
    Cs = U.T @ delta @ V
    Cd = U.T @ (wt - ws) @ V
    share = np.cumsum(s**2) / np.sum(s**2)
    k = int(np.argmax(share >= energy - 1e-12)) + 1
    adj = np.zeros((k, k), dtype=bool)
    for i in range(k):
        for j in range(k):
            if i != j and abs(Cs[i, j]) > 0 and (s[i] == s[j] or abs(Cs[i, j]) / abs(s[i] - s[j]) > tau):
                adj[i, j] = adj[j, i] = True
    groups, label = connected_components(adj, directed=False)
    dens_rows = np.array([np.mean([np.linalg.norm(Cd[i, :k]) for i in range(k) if label[i] == g]) for g in range(groups)])
    dens_cols = np.array([np.mean([np.linalg.norm(Cd[:k, j]) for j in range(k) if label[j] == g]) for g in range(groups)])
    row_dense = np.zeros(m, dtype=bool)
    col_dense = np.zeros(n, dtype=bool)
    for i in range(k):
        row_dense[i] = dens_rows[label[i]] >= np.quantile(dens_rows, rho)
        col_dense[i] = dens_cols[label[i]] >= np.quantile(dens_cols, rho)
    protected = row_dense[:, None] | col_dense[None, :]
    C = np.where(protected, Cs, Cs - Cd)
    score = np.abs(Cs * Cd)
    for i in range(k):
        for j in range(k):
            bi, bj = label == label[i], label == label[j]
            a, b = Cs[:k, :k][np.ix_(bi, bj)], Cd[:k, :k][np.ix_(bi, bj)]
            score[i, j] *= np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)) if np.linalg.norm(a) * np.linalg.norm(b) > 0 else 0.0
    block = np.zeros((m, n), dtype=bool)
    block[:d, :d] = True
    candidates = protected & block & (np.sign(Cs) == np.sign(Cd))
    arbitrated = 0
    if candidates.any():
        threshold = np.quantile(score[candidates], arbitrate_q)
        for i, j in zip(*np.nonzero(candidates & (score > threshold))):
            C[i, j] = (Cs[i, j] if abs(Cs[i, j]) > abs(Cd[i, j]) else Cd[i, j]) - Cd[i, j]
            arbitrated += 1
    info = dict(k=k, groups=groups, protected_rows=int(row_dense.sum()), protected_cols=int(col_dense.sum()), arbitrated=arbitrated)
    return U @ C @ V.T, info


def best_rank(x: np.ndarray, r: int) -> tuple[np.ndarray, float]:
    U, s, Vt = np.linalg.svd(x, full_matrices=False)
    return (U[:, :r] * s[:r]) @ Vt[:r], float(np.sum(s[:r] ** 2) / np.sum(s**2))


def clustered_weight(rng: np.random.Generator, m: int, n: int) -> np.ndarray:
    """Singular values in close clusters (3 at 10, 3 at 7, 2 at 5, 2 at 3.5) over a small tail, so the
    LoRA joins directions within a cluster and never across."""
    d = min(m, n)
    s = np.concatenate([[10.0, 10.02, 10.05], [7.0, 7.03, 7.05], [5.0, 5.02], [3.5, 3.52], np.linspace(0.8, 0.05, d - 10)])
    s = np.sort(s)[::-1]
    U, _ = np.linalg.qr(rng.standard_normal((m, d)))
    V, _ = np.linalg.qr(rng.standard_normal((n, d)))
    return (U * s) @ V.T


def case(m: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ΔW rank 4, W_s, W_t): the target departs by a low-rank pull along some source directions plus noise."""
    rng = np.random.default_rng(seed)
    ws = clustered_weight(rng, m, n)
    delta = 0.05 * rng.standard_normal((m, 4)) @ rng.standard_normal((4, n))
    U, _, Vt = np.linalg.svd(ws)
    pull = 0.4 * (U[:, :3] @ rng.standard_normal((3, 3)) @ Vt[:3]) + 0.3 * (U[:, 6:8] @ rng.standard_normal((2, 2)) @ Vt[6:8])
    wt = ws + pull + 0.01 * rng.standard_normal((m, n))
    return delta, ws, wt


def engine_casa(delta: np.ndarray, ws: np.ndarray, wt: np.ndarray, rank: int | None = 4, **settings: float):
    from prolora_core.casa import CasaSettings, casa_update

    return casa_update(torch.from_numpy(delta), torch.from_numpy(ws), torch.from_numpy(wt), rank, CasaSettings(**settings), "cpu")


@pytest.mark.parametrize("shape", [(24, 24), (40, 24), (24, 40)], ids=["square", "tall", "wide"])
def test_casa_matches_the_dense_reference(shape: tuple[int, int]) -> None:
    delta, ws, wt = case(*shape)
    want, info = reference_casa(delta, ws, wt)
    res = engine_casa(delta, ws, wt)
    # The case exercises every branch: multi-direction groups, protected and free entries, arbitration.
    assert info["groups"] < info["k"], info
    assert 0 < info["protected_rows"] < info["k"] and 0 < info["protected_cols"] < info["k"], info
    assert info["arbitrated"] > 0, info
    assert (res.k, res.groups, res.protected_rows, res.protected_cols, res.arbitrated) == tuple(info.values())
    assert rel_err(res.delta.numpy(), want) <= 1e-10
    assert rel_err(want, delta) > 0.05, "the departure must change the update here"
    low, kept = best_rank(want, 4)
    assert res.factors.rank == 4
    assert rel_err(res.factors.dense().double().numpy(), low) <= 1e-5
    assert res.energy_kept == pytest.approx(kept, abs=1e-6)


@pytest.mark.parametrize("settings", [dict(tau=0.05), dict(rho=0.0), dict(rho=1.0, arbitrate_q=0.5), dict(energy=1.0)],
                         ids=["tau", "rho0", "rho1", "energy1"])
def test_casa_parameters_match_the_reference(settings: dict[str, float]) -> None:
    delta, ws, wt = case(30, 20, seed=3)
    want, info = reference_casa(delta, ws, wt, **settings)
    res = engine_casa(delta, ws, wt, **settings)
    assert (res.k, res.groups, res.protected_rows, res.protected_cols, res.arbitrated) == tuple(info.values())
    assert rel_err(res.delta.numpy(), want) <= 1e-10


@pytest.mark.parametrize("shape", [(24, 24), (40, 24), (24, 40)], ids=["square", "tall", "wide"])
def test_identity_at_target_equal_source(shape: tuple[int, int]) -> None:
    delta, ws, _ = case(*shape, seed=1)
    res = engine_casa(delta, ws, ws.copy())
    assert res.arbitrated == 0 and res.protected_rows == res.k
    assert rel_err(res.delta.numpy(), delta) <= 1e-12
    assert res.energy_kept == pytest.approx(1.0, abs=1e-9)  # rank 4 holds a rank-4 update
    assert rel_err(res.factors.dense().double().numpy(), delta) <= 1e-5
    one = engine_casa(delta, ws, ws.copy(), rank=1)
    low, kept = best_rank(delta, 1)
    assert one.factors.rank == 1 and one.energy_kept == pytest.approx(kept, abs=1e-6) and kept < 0.9
    assert rel_err(one.factors.dense().double().numpy(), low) <= 1e-5


def test_casa_refuses_bad_settings_and_shapes() -> None:
    from prolora_core.casa import CasaSettings
    from prolora_core.errors import ProLoRAError

    for bad in (dict(energy=0.0), dict(tau=0.0), dict(rho=1.5), dict(arbitrate_q=-0.1)):
        with pytest.raises(ProLoRAError, match="CASA"):
            CasaSettings(**bad)
    delta, ws, wt = case(24, 24)
    with pytest.raises(ProLoRAError, match="one shape"):
        engine_casa(delta, ws, wt[:, :20].copy())
    with pytest.raises(ProLoRAError, match="rank must be positive"):
        engine_casa(delta, ws, wt, rank=0)


def test_basis_projections_refuse_casa() -> None:
    from prolora_core.basis import compute_basis
    from prolora_core.projection import Factors, project

    w = torch.randn(8, 8)
    b = compute_basis(w, 2)
    with pytest.raises(ValueError, match="not a projection of bases"):
        project(Factors(torch.randn(8, 1), torch.randn(1, 8), 1.0), b, b, "casa")  # type: ignore[arg-type]


def test_cli_mode_casa_on_real_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bases = make_bases(tmp_path / "in", noise=0.05)
    updates = make_updates()
    lora = write_lora(tmp_path / "in" / "lora.safetensors", updates, "underscore")
    for out_rank in (None, 1):
        out, report_path = tmp_path / f"out{out_rank}.safetensors", tmp_path / f"report{out_rank}.json"
        argv = ["transfer", "--source-base", bases.source, "--target-base", bases.target, "--lora", lora, "--out", out, "--no-cache",
                "--device", "cpu", "--mode", "casa", "--threshold", "0", "--report", report_path] + (["--out-rank", str(out_rank)] if out_rank else [])
        rc, stdout, err = run_main(argv, capsys)
        assert rc == 0, err
        assert f"wrote {out}" in err and "of the energy kept" in stdout, stdout
        result = read_output(out)
        report = read_report(report_path)
        rows = {r["source"]: r for r in report["modules"]}
        assert all(r["transferred"] for r in rows.values()), [(r["source"], r["reason"], r["similarity_u"]) for r in rows.values()]
        kept_sum = total_sum = 0.0
        for module, u in updates.items():
            name = lora_name(module, "underscore")
            want, _ = reference_casa(u.dense(), matrix(bases.ws[module]), matrix(bases.wt[module]))
            rank = out_rank or u.rank
            low, kept = best_rank(want, rank)
            got = result[name]
            assert got.rank == rank and got.up.ndim == got.down.ndim == u.down.ndim, module
            assert rel_err(got.dense(), low) <= 1e-5, module
            assert rows[name]["transferred"] is True and rows[name]["energy_kept"] == pytest.approx(kept, abs=1e-6)
            assert rows[name]["transferred_norm"] == pytest.approx(np.linalg.norm(low), rel=1e-5)
            kept_sum += kept * np.sum(want**2)
            total_sum += np.sum(want**2)
        assert report["summary"]["mode"] == "casa" and report["summary"]["transferred"] == 4
        assert report["summary"]["loras"][str(lora)]["energy_kept"] == pytest.approx(kept_sum / total_sum, abs=1e-6)
        if out_rank == 1:
            assert report["summary"]["loras"][str(lora)]["energy_kept"] < 0.99


def test_cli_casa_parameters_and_provenance(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bases = make_bases(tmp_path / "in", noise=0.05)
    updates = make_updates()
    lora = write_lora(tmp_path / "in" / "lora.safetensors", updates)
    out = tmp_path / "out.safetensors"
    argv = ["transfer", "--source-base", bases.source, "--target-base", bases.target, "--lora", lora, "--out", out, "--no-cache",
            "--device", "cpu", "--mode", "casa", "--threshold", "0", "--casa-rho", "1", "--casa-tau", "0.05", "--casa-energy", "0.99",
            "--casa-quantile", "0.5"]
    rc, _, err = run_main(argv, capsys)
    assert rc == 0, err
    result = read_output(out)
    for module, u in updates.items():
        want, _ = reference_casa(u.dense(), matrix(bases.ws[module]), matrix(bases.wt[module]), energy=0.99, tau=0.05, rho=1.0, arbitrate_q=0.5)
        default, _ = reference_casa(u.dense(), matrix(bases.ws[module]), matrix(bases.wt[module]))
        assert rel_err(result[module].dense(), best_rank(want, u.rank)[0]) <= 1e-5, module
        assert rel_err(want, default) > 1e-3, "the parameters must change the result here"
    assert read_metadata(out)["prolora.casa"] == "energy=0.99,tau=0.05,rho=1,arbitrate_q=0.5"
    rc, _, err = run_main(argv[:-2] + ["--casa-quantile", "1.5"], capsys)
    assert rc != 0 and "arbitration quantile must lie in [0, 1]" in err


def test_project_lora_node_casa_in_the_comfyui_host(nodes_by_id: dict[str, Any], comfyui: Any) -> None:
    from comfy_extras.nodes_train import LoraModelLoader

    for node_id in ("ProLoRAProjectLoRA", "ProLoRATransferLoRAFiles"):
        mode_input = next(i for i in nodes_by_id[node_id].define_schema().inputs if i.id == "mode")
        assert "casa" in mode_input.options, node_id
    modules = ["input_blocks.1.1.transformer_blocks.0.attn1.to_q", "input_blocks.1.1.proj_in", "input_blocks.1.0.in_layers.2",
               "middle_block.1.transformer_blocks.0.ff.net.2"]
    src = comfy_host.tiny_sd15_model(0)
    tgt = comfy_host.perturbed_copy(src, 0.05, 5)
    lora = comfy_host.kohya_lora(src, modules, rank=4, alpha=2.0, seed=1)
    run = lambda node_id, **kw: tuple(nodes_by_id[node_id].execute(**kw).args)  # noqa: E731
    (bs,) = run("ProLoRAComputeBasis", model=src, clip=None, subspace_rank=0, device="cpu", use_cache=False)
    (bt,) = run("ProLoRAComputeBasis", model=tgt, clip=None, subspace_rank=0, device="cpu", use_cache=False)
    match, _ = run("ProLoRAMatchModules", source_basis=bs, target_basis=bt, lora=lora, threshold=0.0, pairing="name")
    out, report = run("ProLoRAProjectLoRA", lora=lora, match=match, mode="casa", out_rank=0, rescale_to_source_norm=False)
    assert report.startswith("ProLoRA casa:") and f"{len(modules)}/{len(modules)} modules transferred" in report
    (patched,) = LoraModelLoader.execute(model=tgt, lora=out, strength_model=1.0).args
    before, after, src_sd = comfy_host.unet_weights(tgt), comfy_host.unet_weights(patched, patched=True), comfy_host.unet_weights(src)
    for mod in modules:
        key, name = f"diffusion_model.{mod}.weight", "lora_unet_" + mod.replace(".", "_")
        up, down = lora[f"{name}.lora_up.weight"].double(), lora[f"{name}.lora_down.weight"].double()
        dense = (2.0 / 4) * (up.reshape(up.shape[0], 4) @ down.reshape(4, -1))
        m = dense.shape[0]
        want, _ = reference_casa(dense.numpy(), src_sd[key].reshape(m, -1).double().numpy(), before[key].reshape(m, -1).double().numpy())
        low, _ = best_rank(want, 4)
        got = (after[key] - before[key]).reshape(m, -1).double().numpy()
        assert rel_err(got, low) <= 1e-4, mod
