"""Top-k singular subspaces of a module weight (the paper's ``U_∥``, ``V_∥``).

Two algorithms, both returning orthonormal ``U`` (``m × k``) and ``V`` (``n × k``):

* ``exact``: ``torch.linalg.svd`` of the whole matrix, truncated. Cost O(m·n·min(m, n)).
* ``randomized``: a seeded Gaussian range finder with oversampling ``p`` and adaptive subspace
  (power) iterations, re-orthonormalised by QR at every half step (Halko, Martinsson & Tropp 2011,
  Alg. 4.4). After each iteration the top-k Ritz subspace is compared with the previous one; the
  loop stops when ``1 − Φ(previous, current) ≤ tol`` or after ``max_iter`` iterations. Cost
  O(m·n·(k + p)) per iteration. The last change is kept as ``subspace_change`` so that callers can
  report how well converged a basis is (a flat spectrum converges slowly: the error per iteration
  shrinks like ``(σ_{k+p+1} / σ_k)²``).

``method="auto"`` takes the exact SVD when ``k + p`` is not well below ``min(m, n)`` (the
randomized method would save nothing there) and the randomized one otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .linalg import as_matrix, linalg_device

Method = Literal["auto", "exact", "randomized"]

#: Bump when anything that changes a basis changes; it is part of every cache key.
ALGORITHM_VERSION = 1


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
        return Basis(self.U[:, :k], self.S[:k], self.V[:, :k], self.shape, self.method, self.iterations, self.subspace_change)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Basis":
        def mv(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype or t.dtype)

        return Basis(mv(self.U), mv(self.S), mv(self.V), self.shape, self.method, self.iterations, self.subspace_change)


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
    CPU and moved there.
    """
    dev = torch.device(device) if device is not None else weight.device
    if linalg_device(dev) != dev:
        return compute_basis(weight, k, settings, linalg_device(dev)).to(dev)
    A = as_matrix(weight.detach()).to(device=dev, dtype=settings.compute_dtype)
    m, n = A.shape
    if not 1 <= k < min(m, n) + 1:
        raise ValueError(f"k={k} is outside [1, {min(m, n)}] for a {m}×{n} weight")
    l = min(k + settings.oversample, min(m, n))
    method = settings.method
    if method == "auto":
        method = "exact" if 2 * l >= min(m, n) else "randomized"
    if method == "exact":
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        return Basis(U[:, :k].contiguous(), S[:k].contiguous(), Vh[:k].T.contiguous(), tuple(weight.shape), "exact")
    return _randomized(A, k, l, settings, tuple(weight.shape))


def _randomized(A: Tensor, k: int, l: int, settings: BasisSettings, shape: tuple[int, ...]) -> Basis:
    m, n = A.shape
    # The test matrix is drawn on the CPU from a seeded generator, so the same seed gives the same
    # start on every device.
    gen = torch.Generator(device="cpu").manual_seed(settings.seed)
    omega = torch.randn(n, l, generator=gen, dtype=settings.compute_dtype).to(A.device)
    Q, _ = torch.linalg.qr(A @ omega)
    prev: Tensor | None = None
    change = 1.0
    it = 0
    for it in range(1, settings.max_iter + 1):
        Qn, _ = torch.linalg.qr(A.T @ Q)  # n × l, orthonormal basis of the row space estimate
        Q, R = torch.linalg.qr(A @ Qn)  # A Qn = Q R, so Qᵀ A Qn = R
        Ur, _, _ = torch.linalg.svd(R)
        cur = Q @ Ur[:, :k]  # top-k Ritz vectors of the left subspace
        if prev is not None:
            change = max(0.0, 1.0 - float((prev.T @ cur).square().sum()) / k)
            if change <= settings.tol:
                break
        prev = cur
    B = Q.T @ A  # l × n
    Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
    U = Q @ Ub[:, :k]
    return Basis(U.contiguous(), S[:k].contiguous(), Vh[:k].T.contiguous(), shape, "randomized", it, change)
