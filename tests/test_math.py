"""The projection modes, bases and similarity against the dense float64 reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from prolora_core import BasisSettings, Factors, compute_basis, project, recompress, subspace_similarity
from prolora_core.lora import LoraModule, module_tensors

from reference import gapped_weight, phi, power_law_weight, reference_transfer, top_bases

MODES = ["prolora", "prolora-full", "subspace", "copy"]
EXACT64 = BasisSettings(method="exact", compute_dtype=torch.float64)
FAST32 = BasisSettings(method="randomized", compute_dtype=torch.float32)
# (weight shape, LoRA rank): wide, tall, conv 3×3
SHAPES = [((48, 80), 4), ((80, 48), 4), ((16, 8, 3, 3), 3)]


def _lora(rng: np.random.Generator, shape: tuple[int, ...], r: int) -> tuple[Factors, np.ndarray]:
    m = shape[0]
    n = int(np.prod(shape[1:]))
    B, A = rng.standard_normal((m, r)), rng.standard_normal((r, n))
    scale = 0.75
    return Factors(torch.from_numpy(B), torch.from_numpy(A), scale), scale * B @ A


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,r", SHAPES)
def test_modes_match_dense_reference_with_exact_bases(mode: str, shape: tuple[int, ...], r: int) -> None:
    rng = np.random.default_rng(1)
    ws = rng.standard_normal(shape)
    wt = ws + 0.3 * rng.standard_normal(shape)
    k = 6
    lora, dense = _lora(rng, shape, r)
    bs = compute_basis(torch.from_numpy(ws), k, EXACT64)
    bt = compute_basis(torch.from_numpy(wt), k, EXACT64)
    out = project(lora, bs, bt, mode)
    expected = reference_transfer(dense, ws.reshape(shape[0], -1), wt.reshape(shape[0], -1), k, mode)
    assert _rel(out.dense().numpy(), expected) <= 1e-6


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("m,n", [(160, 256), (256, 160)])
def test_modes_match_reference_with_fast_bases_on_gapped_spectra(mode: str, m: int, n: int) -> None:
    rng = np.random.default_rng(2)
    k = 12
    ws = gapped_weight(rng, m, n, k)
    wt = ws + 0.05 * gapped_weight(rng, m, n, k)
    lora, dense = _lora(rng, (m, n), 4)
    bs = compute_basis(torch.from_numpy(ws).float(), k, FAST32)
    bt = compute_basis(torch.from_numpy(wt).float(), k, FAST32)
    assert bs.method == "randomized" and bs.iterations >= 1
    out = project(Factors(lora.up.float(), lora.down.float(), lora.scale), bs, bt, mode)
    assert _rel(out.dense().double().numpy(), reference_transfer(dense, ws, wt, k, mode)) <= 1e-3


def test_randomized_basis_converges_on_power_law_spectrum() -> None:
    """No gap: the adaptive iterations must still reach the exact top-k subspace closely."""
    rng = np.random.default_rng(3)
    w = power_law_weight(rng, 256, 384)
    k = 16
    fast = compute_basis(torch.from_numpy(w).float(), k, FAST32)
    Ue, Ve = top_bases(w, k)
    assert phi(Ue, fast.U.double().numpy()) > 0.99
    assert phi(Ve, fast.V.double().numpy()) > 0.99
    assert fast.iterations > 2  # it had to iterate, and said how far it got
    assert 0 <= fast.subspace_change <= BasisSettings().tol or fast.iterations == BasisSettings().max_iter


def test_randomized_basis_is_seeded() -> None:
    w = torch.from_numpy(power_law_weight(np.random.default_rng(4), 128, 200)).float()
    a = compute_basis(w, 8, FAST32)
    b = compute_basis(w, 8, FAST32)
    assert torch.equal(a.U, b.U) and torch.equal(a.V, b.V)


def test_bases_are_orthonormal_and_ordered() -> None:
    w = torch.from_numpy(power_law_weight(np.random.default_rng(5), 100, 140))
    for s in (EXACT64, FAST32):
        b = compute_basis(w.to(s.compute_dtype), 10, s)
        eye = torch.eye(10, dtype=b.U.dtype)
        assert torch.allclose(b.U.T @ b.U, eye, atol=1e-5)
        assert torch.allclose(b.V.T @ b.V, eye, atol=1e-5)
        assert bool((b.S[:-1] >= b.S[1:] - 1e-6).all())
        assert b.truncate(4).U.shape == (100, 4)


def test_similarity_identical_and_unrelated() -> None:
    rng = np.random.default_rng(6)
    d, k = 400, 20
    w = torch.from_numpy(rng.standard_normal((d, d)))
    b = compute_basis(w, k, EXACT64)
    assert subspace_similarity(b.U, b.U) == pytest.approx(1.0, abs=1e-12)
    other = compute_basis(torch.from_numpy(rng.standard_normal((d, d))), k, EXACT64)
    s = subspace_similarity(b.U, other.U)
    assert s == pytest.approx(k / d, abs=0.04)  # chance level


@settings(max_examples=25, deadline=None)
@given(m=st.integers(6, 40), n=st.integers(6, 40), r=st.integers(1, 5), k=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_full_mode_gives_the_lora_back_when_target_is_source(m: int, n: int, r: int, k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    w = torch.from_numpy(rng.standard_normal((m, n)))
    b = compute_basis(w, min(k, min(m, n) - 1), EXACT64)
    lora, dense = _lora(rng, (m, n), r)
    out = project(lora, b, b, "prolora-full")
    assert out.rank == r
    assert _rel(out.dense().numpy(), dense) <= 1e-9


@settings(max_examples=25, deadline=None)
@given(m=st.integers(6, 40), n=st.integers(6, 40), r=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_eq3_is_idempotent_and_rank_bounded(m: int, n: int, r: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = max(1, min(m, n) // 3)
    bs = compute_basis(torch.from_numpy(rng.standard_normal((m, n))), k, EXACT64)
    bt = compute_basis(torch.from_numpy(rng.standard_normal((m, n))), k, EXACT64)
    lora, _ = _lora(rng, (m, n), r)
    once = project(lora, bs, bt, "prolora")
    assert once.rank == 2 * r
    assert int(torch.linalg.matrix_rank(once.dense())) <= min(2 * r, m, n)
    full = project(lora, bs, bt, "prolora-full")
    assert int(torch.linalg.matrix_rank(full.dense())) <= r
    # With target = source, Eq. 3 is a projection: applying it twice changes nothing.
    a = project(lora, bt, bt, "prolora")
    b = project(a, bt, bt, "prolora")
    assert _rel(b.dense().numpy(), a.dense().numpy()) <= 1e-9


def test_eq3_does_not_give_the_lora_back_but_full_does() -> None:
    """The note's figure: a random rank-4 LoRA of a 320 × 640 weight, k = 32, target = source."""
    rng = np.random.default_rng(7)
    w = torch.from_numpy(rng.standard_normal((320, 640)))
    b = compute_basis(w, 32, EXACT64)
    lora, dense = _lora(rng, (320, 640), 4)
    err_eq3 = _rel(project(lora, b, b, "prolora").dense().numpy(), dense)
    assert 0.2 < err_eq3 < 0.6
    assert _rel(project(lora, b, b, "prolora-full").dense().numpy(), dense) < 1e-10


@settings(max_examples=20, deadline=None)
@given(r=st.integers(1, 6), alpha=st.floats(0.1, 64.0), out_r=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_alpha_written_so_comfyui_scaling_reproduces_the_update(r: int, alpha: float, out_r: int, seed: int) -> None:
    """ComfyUI applies ``alpha / rank · up @ down`` with rank = rows of down, whatever the rank."""
    rng = np.random.default_rng(seed)
    up, down = torch.from_numpy(rng.standard_normal((20, out_r))), torch.from_numpy(rng.standard_normal((out_r, 30)))
    f = Factors(up, down, alpha / r)
    like = LoraModule("m", up, down, alpha, "m.lora_up.weight", "m.lora_down.weight")
    t = module_tensors("m", f, like, torch.float64)
    applied = float(t["m.alpha"]) / t["m.lora_down.weight"].shape[0] * (t["m.lora_up.weight"] @ t["m.lora_down.weight"])
    assert torch.allclose(applied, f.dense(), rtol=1e-6, atol=1e-9)


def test_conv_flattening_round_trip() -> None:
    rng = np.random.default_rng(8)
    up, down = torch.from_numpy(rng.standard_normal((16, 3, 1, 1))), torch.from_numpy(rng.standard_normal((3, 8, 3, 3)))
    mod = LoraModule("c", up, down, 3.0, "c.lora_up.weight", "c.lora_down.weight")
    f = mod.factors(torch.float64)
    assert f.up.shape == (16, 3) and f.down.shape == (3, 72)
    t = module_tensors("c", f, mod, torch.float64)
    assert t["c.lora_up.weight"].shape == (16, 3, 1, 1) and t["c.lora_down.weight"].shape == (3, 8, 3, 3)
    assert torch.equal(t["c.lora_down.weight"], down) and torch.equal(t["c.lora_up.weight"], up)
    # The flattened order matches torch's conv weight flattening: the update equals the dense einsum.
    dense = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
    assert torch.allclose(f.dense().reshape(16, 8, 3, 3), dense)


def test_recompress_is_the_best_low_rank_approximation() -> None:
    rng = np.random.default_rng(9)
    f = Factors(torch.from_numpy(rng.standard_normal((30, 8))), torch.from_numpy(rng.standard_normal((8, 50))), 0.5)
    dense = f.dense().numpy()
    s = np.linalg.svd(dense, compute_uv=False)
    rc = recompress(f, 3)
    assert rc.factors.rank == 3
    assert rc.energy_dropped == pytest.approx(float(np.sum(s[3:] ** 2) / np.sum(s**2)), rel=1e-9)
    assert np.linalg.norm(rc.factors.dense().numpy() - dense) == pytest.approx(float(np.sqrt(np.sum(s[3:] ** 2))), rel=1e-9)
    exact = recompress(f, 8)
    assert exact.energy_dropped == pytest.approx(0.0, abs=1e-12)
    assert _rel(exact.factors.dense().numpy(), dense) < 1e-10


def test_factored_norm_matches_dense() -> None:
    rng = np.random.default_rng(10)
    f = Factors(torch.from_numpy(rng.standard_normal((30, 5))), torch.from_numpy(rng.standard_normal((5, 40))), 1.7)
    assert f.frobenius_norm() == pytest.approx(float(np.linalg.norm(f.dense().numpy())), rel=1e-12)


@pytest.mark.gpu
def test_projection_on_cuda_matches_cpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    rng = np.random.default_rng(11)
    ws, wt = (torch.from_numpy(gapped_weight(rng, 320, 640, 16)).float() for _ in range(2))
    lora, _ = _lora(rng, (320, 640), 4)
    lora = Factors(lora.up.float(), lora.down.float(), lora.scale)
    cpu = project(lora, compute_basis(ws, 16, FAST32), compute_basis(wt, 16, FAST32), "prolora")
    gpu = project(lora, compute_basis(ws, 16, FAST32, "cuda"), compute_basis(wt, 16, FAST32, "cuda"), "prolora")
    assert _rel(gpu.dense().cpu().double().numpy(), cpu.dense().double().numpy()) < 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_randomized_basis_stays_orthonormal_when_its_krylov_space_would_fill_the_matrix(dtype: torch.dtype) -> None:
    """A square 128 × 128 weight at the default k = 32 (SD1.5's time_embed.2 in the tiny host model):
    l = k + 16 = 48 and the restarted space holds 3l = 144 ≥ 128 vectors. Randomized bases came back
    with V far from orthonormal (Φ_V ≈ 11 between a base and itself, a 159× LoRA norm); they must be
    orthonormal and give the exact top-k subspace."""
    w = torch.from_numpy(np.random.default_rng(7).standard_normal((128, 128))).to(dtype)
    k = 32
    Ue, Ve = top_bases(w.double().numpy(), k)
    for method in ("auto", "randomized"):
        b = compute_basis(w, k, BasisSettings(method=method, compute_dtype=dtype))
        eye = torch.eye(k, dtype=torch.float64)
        assert torch.allclose(b.U.double().T @ b.U.double(), eye, atol=1e-5), method
        assert torch.allclose(b.V.double().T @ b.V.double(), eye, atol=1e-5), method
        assert phi(Ue, b.U.double().numpy()) == pytest.approx(1.0, abs=1e-4), method
        assert phi(Ve, b.V.double().numpy()) == pytest.approx(1.0, abs=1e-4), method
        assert subspace_similarity(b.V, b.V) == pytest.approx(1.0, abs=1e-4), method


def test_randomized_basis_stays_orthonormal_over_many_steps() -> None:
    """A flat (Gaussian) spectrum makes the block Krylov iteration take many steps; U and V
    must stay orthonormal to float32 rounding, not drift (6e-4 off at 266 × 256, k = 64, before the second projection)."""
    w = torch.from_numpy(np.random.default_rng(8).standard_normal((266, 256))).float()
    b = compute_basis(w, 64, FAST32)
    assert b.method == "randomized"
    eye = torch.eye(64, dtype=torch.float64)
    assert (b.U.double().T @ b.U.double() - eye).abs().max() < 1e-4
    assert (b.V.double().T @ b.V.double() - eye).abs().max() < 1e-4
