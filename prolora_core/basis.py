"""Top-k singular subspaces of a module weight (the paper's ``U_∥``, ``V_∥``).

Two algorithms, both returning orthonormal ``U`` (``m × k``) and ``V`` (``n × k``):

* ``exact``: ``torch.linalg.svd`` of the whole matrix, truncated. Cost O(m·n·min(m, n)).
* ``randomized``: a seeded Gaussian range finder with oversampling ``p`` and adaptive subspace
  (power) iterations, re-orthonormalised by QR at every half step (Halko, Martinsson & Tropp 2011,
  Alg. 4.4). After each iteration the top-k Ritz subspace is compared with the previous one; the
  loop stops when ``1 − Φ(previous, current) ≤ tol`` or after ``max_iter`` iterations. Cost
  O(m·n·(k + p)) per iteration. The last change is kept as ``subspace_change``, and the estimated
  distance to the exact subspace as ``uncertainty`` (the last step's largest principal-angle sine
  times ``ρ / (1 − ρ)``, ``ρ = (σ_{k+p} / σ_k)²`` the rate per iteration): a flat spectrum
  converges slowly and its top-k subspace is barely defined, so the basis says how far it may be off.

Bases of equal-shape weights are computed together (:func:`compute_bases`): stacked ``[B, m, n]``,
batched matmul, QR and SVD, each item stopping on its own test.

``method="auto"`` takes the exact SVD when ``k + p`` is not well below ``min(m, n)`` (the
randomized method would save nothing there) and the randomized one otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor

from .linalg import as_matrix, linalg_device

Method = Literal["auto", "exact", "randomized"]

#: Bump when anything that changes a basis changes; it is part of every cache key.
ALGORITHM_VERSION = 2  # 2: bases carry their uncertainty (cache entries of 1 lack it)


@dataclass(frozen=True)
class BasisSettings:
    """Everything besides the weight itself that changes a computed basis (part of the cache key)."""

    method: Method = "auto"
    oversample: int = 16
    max_iter: int = 24
    tol: float = 1e-5
    seed: int = 0
    compute_dtype: torch.dtype = torch.float32
    #: one CPU thread for every basis and projection, so the bits do not depend on the thread count
    deterministic: bool = False

    def key(self) -> str:
        dt = str(self.compute_dtype).removeprefix("torch.")
        det = "-det" if self.deterministic else ""
        return f"v{ALGORITHM_VERSION}-{self.method}-p{self.oversample}-it{self.max_iter}-tol{self.tol:g}-s{self.seed}-{dt}{det}"


@dataclass(frozen=True)
class Basis:
    """Top-k left/right singular subspaces of one weight.

    ``U``: ``m × k``, ``V``: ``n × k`` (orthonormal columns, on the compute device), ``S``: the k
    leading singular values, descending. ``shape`` is the weight's own shape (conv kept 4-D).
    ``subspace_change`` is 0 for the exact method, else the last iteration's ``1 − Φ``.
    """

    U: Tensor
    S: Tensor
    V: Tensor
    shape: tuple[int, ...]
    method: str
    iterations: int = 0
    subspace_change: float = 0.0
    #: estimated sine of the largest principal angle to the exact top-k subspace (0 for the exact
    #: method; see :func:`_uncertainty`): each projector ``P_U``, ``P_V`` is uncertain by this much in norm
    uncertainty: float = 0.0

    @property
    def k(self) -> int:
        return int(self.U.shape[1])

    @property
    def dims(self) -> tuple[int, int]:
        return int(self.U.shape[0]), int(self.V.shape[0])

    def truncate(self, k: int) -> "Basis":
        """The leading ``k`` columns (served from a basis of larger k: singular vectors are ordered)."""
        if k > self.k:
            raise ValueError(f"basis holds k={self.k}, asked for k={k}")
        if k == self.k:
            return self
        return Basis(self.U[:, :k], self.S[:k], self.V[:, :k], self.shape, self.method, self.iterations, self.subspace_change, self.uncertainty)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Basis":
        def mv(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype or t.dtype)

        return Basis(mv(self.U), mv(self.S), mv(self.V), self.shape, self.method, self.iterations, self.subspace_change, self.uncertainty)


def clamp_rank(k: int, m: int, n: int) -> int:
    """``k`` clamped to ``[1, min(m, n) − 1]`` (with all of ``U`` the null space would be empty)."""
    if k <= 0:
        raise ValueError(f"subspace rank must be positive, got {k}")
    return max(1, min(int(k), min(m, n) - 1))


def default_rank(m: int, n: int) -> int:
    """The default subspace rank: ``min(64, min(m, n) // 4)``, so the chance level k/d stays ≤ 0.25."""
    return max(1, min(64, min(m, n) // 4))


def compute_basis(weight: Tensor, k: int, settings: BasisSettings = BasisSettings(), device: torch.device | str | None = None) -> Basis:
    """Top-k singular subspaces of ``weight`` (any float dtype; computed in ``settings.compute_dtype``).

    ``k`` must already be clamped (see :func:`clamp_rank`). The result lives on ``device``
    (default: the weight's device); on Apple's MPS, which lacks QR and SVD, it is computed on the
    CPU and moved there. The same as :func:`compute_bases` of the one weight.
    """
    return compute_bases([weight], k, settings, device)[0]


def stack_weights(weights: Sequence[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """``[B, m, n]``: the matrix views of equal-shape weights, copied into one tensor (in ``dtype``,
    default the first weight's). One allocation, no intermediate per-weight conversion."""
    mats = [as_matrix(w.detach()) for w in weights]
    out = torch.empty((len(mats), *mats[0].shape), dtype=dtype or mats[0].dtype, device=mats[0].device)
    for i, a in enumerate(mats):
        if a.shape != out.shape[1:]:
            raise ValueError(f"a batch of bases needs weights of one matrix shape: {tuple(a.shape)} vs {tuple(out.shape[1:])}")
        out[i].copy_(a)
    return out


def compute_bases(weights: Sequence[Tensor] | Tensor, k: int, settings: BasisSettings = BasisSettings(),
                  device: torch.device | str | None = None, shapes: Sequence[tuple[int, ...]] | None = None) -> list[Basis]:
    """Top-k bases of B weights of one matrix shape ``m × n``, computed together as one stacked batch.

    ``weights``: a sequence of weights (2-D or conv), or an already stacked ``[B, m, n]`` tensor
    (:func:`stack_weights`; then ``shapes`` gives each weight's own shape). Batched matmul, QR and
    SVD over ``[B, m, l]``; each item runs its own power iterations and stops on its own test, from
    the same seeded test matrix, so every basis equals the one :func:`compute_basis` gives for that
    weight alone (up to rounding of the batched kernels). Memory: the batch in the compute dtype plus
    ``O(B·(m + n)·l)``; callers bound B (:class:`prolora_core.match.BasisProvider`).
    """
    if isinstance(weights, Tensor):
        if weights.ndim != 3:
            raise ValueError(f"a stacked batch of weights is [B, m, n], got shape {tuple(weights.shape)}")
        stacked = weights
        own = [tuple(s) for s in shapes] if shapes is not None else [tuple(weights.shape[1:])] * weights.shape[0]
    else:
        if not weights:
            return []
        own = [tuple(w.shape) for w in weights]
        if len(weights) == 1:  # a view: no copy, converted on the compute device below
            stacked = as_matrix(weights[0].detach()).unsqueeze(0)
        else:
            stacked = stack_weights(weights, None if len({w.dtype for w in weights}) == 1 else settings.compute_dtype)
    dev = torch.device(device) if device is not None else stacked.device
    if linalg_device(dev) != dev:
        return [b.to(dev) for b in compute_bases(stacked, k, settings, linalg_device(dev), own)]
    A = stacked.detach().to(device=dev, dtype=settings.compute_dtype)
    _, m, n = A.shape
    if not 1 <= k < min(m, n) + 1:
        raise ValueError(f"k={k} is outside [1, {min(m, n)}] for a {m}×{n} weight")
    l = min(k + settings.oversample, min(m, n))
    method = settings.method
    if method == "auto":
        method = "exact" if 2 * l >= min(m, n) else "randomized"
    if method == "exact":
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        return [Basis(U[i, :, :k].contiguous(), S[i, :k].contiguous(), Vh[i, :k].T.contiguous(), own[i], "exact") for i in range(A.shape[0])]
    return _randomized(A, k, l, settings, own)


def _randomized(A: Tensor, k: int, l: int, settings: BasisSettings, shapes: list[tuple[int, ...]]) -> list[Basis]:
    """Halko et al. Alg. 4.4 on a batch ``A`` ``[B, m, n]``, each item iterating until its own
    ``1 − Φ(previous, current) ≤ tol`` (converged items leave the batch)."""
    b, m, n = A.shape
    # The test matrix is drawn on the CPU from a seeded generator, so the same seed gives the same
    # start on every device (and for every item of a batch).
    gen = torch.Generator(device="cpu").manual_seed(settings.seed)
    omega = torch.randn(n, l, generator=gen, dtype=settings.compute_dtype).to(A.device)
    Q, _ = torch.linalg.qr(A @ omega)  # B × m × l
    prev = torch.zeros(b, m, k, dtype=A.dtype, device=A.device)
    iterations, change, angle, rho = [0] * b, [1.0] * b, [1.0] * b, [1.0] * b
    active = list(range(b))
    for it in range(1, settings.max_iter + 1):
        every = len(active) == b
        idx = None if every else torch.tensor(active, device=A.device)
        Aa = A if idx is None else A.index_select(0, idx)
        Qa = Q if idx is None else Q.index_select(0, idx)
        Qn, _ = torch.linalg.qr(Aa.mT @ Qa)  # n × l, orthonormal basis of the row space estimate
        Qa, R = torch.linalg.qr(Aa @ Qn)  # A Qn = Q R, so Qᵀ A Qn = R
        Ur, Sr, _ = torch.linalg.svd(R)
        cur = Qa @ Ur[..., :k]  # top-k Ritz vectors of the left subspace
        # the error of a direction shrinks by ≈ ρ = (σ_{l+1} / σ_k)² per iteration; the Ritz value σ_l ≥ σ_{l+1} bounds it
        rate = [0.0] * len(active) if l >= min(m, n) else (Sr[..., l - 1] / Sr[..., k - 1]).square().clamp(0.0, 1.0).tolist()
        if idx is None:
            Q = Qa
        else:
            Q.index_copy_(0, idx, Qa)
        still = []
        if it > 1:
            P = prev if idx is None else prev.index_select(0, idx)
            M = P.mT @ cur  # k × k: the cosines of the principal angles are its singular values
            ch = (1.0 - M.square().sum((-2, -1)) / k).clamp_min(0.0).tolist()
            # sin θ_max = ‖(I − P_prev) cur‖₂, from the residual itself (1 − cos² would lose it to rounding below ~1e-3)
            res = cur - P @ M
            sin = torch.linalg.eigvalsh(res.mT @ res)[..., -1].clamp_min(0.0).sqrt().tolist()
        for j, i in enumerate(active):
            iterations[i] = it
            if it > 1:
                change[i], angle[i] = ch[j], sin[j]
            rho[i] = rate[j]
            if it == 1 or change[i] > settings.tol:
                still.append(i)
        if idx is None:
            prev = cur
        else:
            prev.index_copy_(0, idx, cur)
        active = still
        if not active:
            break
    Bm = Q.mT @ A  # B × l × n
    Ub, S, Vh = torch.linalg.svd(Bm, full_matrices=False)
    U = Q @ Ub[..., :k]
    return [Basis(U[i].contiguous(), S[i, :k].contiguous(), Vh[i, :k].T.contiguous(), shapes[i], "randomized", iterations[i], change[i],
                  _uncertainty(angle[i], rho[i])) for i in range(b)]


def _uncertainty(step: float, rho: float) -> float:
    """The estimated ``sin θ_max`` between a randomized top-k subspace and the exact one.

    ``step``: the last iteration's ``sin θ_max(previous, current)``; ``rho``: the convergence rate
    per iteration. With linear convergence the distance left is ``step · ρ / (1 − ρ)`` (a geometric
    tail); capped at 1. bench/accuracy.py checks it against the exact subspace: 3e-5 estimated for
    2.4e-5 true on a gapped spectrum, 7.6e-2 for 6.9e-2 on a power-law one.
    """
    if step <= 0.0 or rho <= 0.0:
        return 0.0
    return 1.0 if rho >= 0.999 else min(1.0, step * rho / (1.0 - rho))
