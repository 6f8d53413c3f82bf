"""Batched bases, the batch-wise basis provider, the sketch that ranks similarity candidates, and
the reported basis uncertainty: each against per-module computation or the float64 reference."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from prolora_core import BasisSettings, compute_basis
from prolora_core.basis import compute_bases, stack_weights
from prolora_core.cache import BasisCache
from prolora_core.config import TransferConfig
from prolora_core.errors import ProLoRAError
from prolora_core.match import BasisProvider, Sketches, match_modules
from prolora_core.similarity import basis_similarity
from prolora_core.weights import SafetensorsWeights

from reference import gapped_weight, phi, power_law_weight, top_bases

FAST32 = BasisSettings(method="randomized")


def _sin_max(exact: np.ndarray, B: np.ndarray) -> float:
    """Largest principal-angle sine between two orthonormal bases, from the residual."""
    Q, _ = np.linalg.qr(B)
    return float(np.linalg.norm(Q - exact @ (exact.T @ Q), 2))


def _weights(seed: int, shape: tuple[int, ...], count: int) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    m, n = shape[0], int(np.prod(shape[1:]))
    out = []
    for i in range(count):  # alternate gapped and power-law spectra: items converge after different iteration counts
        w = gapped_weight(rng, m, n, 12) if i % 2 == 0 else power_law_weight(rng, m, n)
        out.append(torch.from_numpy(w.reshape(shape)).float())
    return out


@pytest.mark.parametrize("shape", [(160, 256), (256, 160), (64, 16, 3, 3)])
def test_batched_bases_equal_per_module_bases_and_the_exact_subspace(shape: tuple[int, ...]) -> None:
    ws = _weights(1, shape, 4)
    k = 12 if min(shape[0], int(np.prod(shape[1:]))) > 100 else 6
    settings = FAST32 if k == 12 else BasisSettings(method="randomized", oversample=8)  # room for 3 Krylov blocks of 14 in 64
    batch = compute_bases(ws, k, settings)
    assert len({b.iterations for b in batch}) > 1  # the items stopped after different iteration counts
    for w, b in zip(ws, batch):
        alone = compute_basis(w, k, settings)
        assert b.shape == tuple(w.shape) and b.method == "randomized"
        assert b.iterations == alone.iterations and b.subspace_change == pytest.approx(alone.subspace_change, abs=1e-7)
        assert torch.allclose(b.U, alone.U, atol=1e-5) and torch.allclose(b.V, alone.V, atol=1e-5)
        assert torch.allclose(b.S, alone.S, rtol=1e-5)
        Ue, Ve = top_bases(w.double().numpy(), k)
        assert phi(Ue, b.U.double().numpy()) > 0.99 and phi(Ve, b.V.double().numpy()) > 0.99


def test_batched_exact_method_is_the_svd() -> None:
    ws = _weights(2, (40, 60), 3)
    for w, b in zip(ws, compute_bases(ws, 5, BasisSettings(method="exact", compute_dtype=torch.float64))):
        Ue, Ve = top_bases(w.double().numpy(), 5)
        assert b.method == "exact" and b.uncertainty == 0.0
        assert phi(Ue, b.U.numpy()) == pytest.approx(1.0, abs=1e-9) and phi(Ve, b.V.numpy()) == pytest.approx(1.0, abs=1e-9)


def test_a_batch_refuses_mixed_shapes() -> None:
    with pytest.raises(ValueError, match="one matrix shape"):
        stack_weights([torch.zeros(4, 6), torch.zeros(6, 4)])


@pytest.mark.parametrize("spectrum", ["gapped", "powerlaw"])
def test_reported_uncertainty_tracks_the_distance_to_the_exact_subspace(spectrum: str) -> None:
    """The estimate is within a factor 3 of the true largest principal-angle sine (both sides)."""
    rng = np.random.default_rng(3)
    w = gapped_weight(rng, 256, 384, 16, gap=10.0) if spectrum == "gapped" else power_law_weight(rng, 256, 384)
    b = compute_basis(torch.from_numpy(w).float(), 16, FAST32)
    Ue, _ = top_bases(w, 16)
    true = _sin_max(Ue, b.U.double().numpy())
    assert b.uncertainty > 0
    assert true / 3 <= b.uncertainty <= 3 * true + 1e-5, (true, b.uncertainty)
    assert b.uncertainty <= FAST32.tol  # it iterated until its own estimate met the tolerance
    if spectrum == "gapped":
        assert b.uncertainty < 1e-4 and b.iterations == 2  # a gap makes the subspace well defined at once
    else:
        assert b.iterations > 2  # no gap: it took more steps to get there


def _write(path: Path, ws: dict[str, torch.Tensor]) -> SafetensorsWeights:
    save_file({k: v.half().contiguous() for k, v in ws.items()}, str(path))
    return SafetensorsWeights(path)


def test_provider_prefetches_in_bounded_batches_through_the_cache(tmp_path: Path) -> None:
    ws = {f"blocks.{i}.w.weight": w for i, w in enumerate(_weights(4, (96, 128), 5))}
    ws |= {f"blocks.{i}.c.weight": w for i, w in enumerate(_weights(5, (32, 8, 3, 3), 3))}
    src = _write(tmp_path / "a.safetensors", ws)
    requests = [(src, key, 8) for key in ws] + [(src, "blocks.0.w.weight", 8)]  # a repeat is computed once
    steps: list[tuple[int, int]] = []
    batches: list[str] = []
    cache = BasisCache(tmp_path / "cache", FAST32)
    # 96×128 fp32 + a read-ahead copy ≈ 0.1 MB: a 0.2 MB budget makes batches of 2
    p = BasisProvider(FAST32, torch.device("cpu"), cache, batch_mb=0.2)
    assert p._batch_size(96, 128) == 2
    p.prefetch(requests, lambda i, n, what: (steps.append((i, n)), "look" in what or batches.append(what)))
    assert p.stats.svd_computed == len(ws) and p.stats.bases_from_cache == 0
    assert steps[0] == (0, len(ws)) and [i for i, _ in steps] == sorted(i for i, _ in steps) and steps[-1] == (len(ws) - 3, len(ws))  # before each batch
    assert p._batch_size(32, 72) >= 3 and len(batches) == 3 + 1  # 5 weights in batches of 2, the 3 (smaller) convs in one
    assert len(steps) == len(ws) + len(batches)  # every look-up reports too
    for key, w in ws.items():
        b = p.get(src, key, 8)
        alone = compute_basis(src.get(key), 8, FAST32)
        assert b.shape == tuple(w.shape)
        assert basis_similarity(b, alone).phi > 1 - 1e-5
    again = BasisProvider(FAST32, torch.device("cpu"), cache)
    again.prefetch(requests)
    assert again.stats.svd_computed == 0 and again.stats.bases_from_cache == len(ws)
    assert torch.equal(again.get(src, "blocks.2.c.weight", 8).U, p.get(src, "blocks.2.c.weight", 8).U)


def test_provider_names_a_non_finite_weight_read_ahead(tmp_path: Path) -> None:
    ws = {f"m{i}.weight": w for i, w in enumerate(_weights(6, (40, 64), 3))}
    ws["m2.weight"][3, 5] = float("nan")
    src = _write(tmp_path / "nan.safetensors", ws)
    p = BasisProvider(FAST32, torch.device("cpu"), batch_mb=0.01)  # one weight a batch: m2 is read ahead
    with pytest.raises(ProLoRAError, match="NaN or Inf") as e:
        p.prefetch([(src, key, 4) for key in ws])
    assert "m2.weight" in str(e.value) and "nan.safetensors" in str(e.value)


def test_sketch_estimates_phi_within_its_stated_error() -> None:
    rng = np.random.default_rng(7)
    base = gapped_weight(rng, 200, 300, 20, gap=20.0)
    ws = [base + eps * gapped_weight(rng, 200, 300, 20, gap=20.0) for eps in (0.01, 0.1, 0.3, 1.0, 3.0)]
    ws += [power_law_weight(rng, 200, 300) for _ in range(3)]
    bases = [compute_basis(torch.from_numpy(w), 20, BasisSettings(method="exact", compute_dtype=torch.float64)) for w in ws]
    src = compute_basis(torch.from_numpy(base), 20, BasisSettings(method="exact", compute_dtype=torch.float64))
    sk = Sketches()
    est = sk.estimate(src, bases).tolist()
    exact = [basis_similarity(src, b).phi for b in bases]
    assert exact[0] > 0.95 and exact[-1] < 0.3  # the set spans related to unrelated
    sigma = 1 / (sk.columns(20) * 20) ** 0.5
    for e, x in zip(est, exact):
        assert abs(e - x) <= 4 * sigma, (e, x)


def test_similarity_pairing_finds_the_pairs_an_exhaustive_search_finds() -> None:
    """A target with its blocks shuffled: the shortlist's pairs are the all-candidates argmax."""

    class Mem:
        label = "mem"

        def __init__(self, w: dict[str, torch.Tensor]) -> None:
            self.w = w

        def keys(self) -> list[str]:
            return list(self.w)

        def shape(self, key: str) -> tuple[int, ...]:
            return tuple(self.w[key].shape)

        def get(self, key: str) -> torch.Tensor:
            return self.w[key]

        def content_key(self, key: str) -> str:
            return key

    rng = np.random.default_rng(8)
    n_blocks = 12
    ws = {f"blocks.{i}.proj.weight": torch.from_numpy(gapped_weight(rng, 96, 128, 24, gap=5.0)).float() for i in range(n_blocks)}
    perm = rng.permutation(n_blocks)
    wt = {f"blocks.{perm[i]}.proj.weight": w + 0.02 * torch.randn(w.shape, dtype=w.dtype) for i, w in enumerate(ws.values())}
    wt |= {f"extra.{j}.proj.weight": torch.from_numpy(power_law_weight(rng, 96, 128)).float() for j in range(6)}  # unrelated candidates
    k = 24  # the default rank of a 96 × 128 weight: the gap is there
    exact = {t: compute_basis(w, k, BasisSettings(method="exact", compute_dtype=torch.float64)) for t, w in wt.items()}
    for threshold in (0.0, 0.8):
        config = TransferConfig(pairing="similarity", threshold=threshold, device="cpu")
        seen: list[tuple[int, int]] = []
        found, stats = match_modules(list(ws), Mem(ws), Mem(wt), config, progress=lambda i, n, _: seen.append((i, n)))
        assert seen[0][0] == 0 and [i for i, _ in seen] == sorted(i for i, _ in seen) and seen[-1][0] == seen[-1][1] - 1
        assert len({n for _, n in seen}) == 1  # one total from the first call on
        for i, key in enumerate(ws):
            m = found[key]
            assert m.target_key == f"blocks.{perm[i]}.proj.weight" and m.passes(config)
            assert m.k == k
            best = max(wt, key=lambda t: basis_similarity(m.source_basis.to("cpu", torch.float64), exact[t]).phi)
            assert m.target_key == best
            assert m.uncertainty is not None and m.uncertainty < 1e-3


def test_batched_bases_on_cuda_match_cpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    ws = _weights(9, (320, 640), 4)
    cpu = compute_bases(ws, 16, FAST32)
    gpu = compute_bases(ws, 16, FAST32, "cuda")
    for a, b in zip(cpu, gpu):
        assert b.U.device.type == "cuda"
        assert basis_similarity(a, b.to("cpu")).phi > 1 - 1e-4
