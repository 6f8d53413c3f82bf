"""Top-k singular subspaces of a module weight (the paper's ``U_∥``, ``V_∥``).

Two algorithms, both returning orthonormal ``U`` (``m × k``) and ``V`` (``n × k``):

* ``exact``: ``torch.linalg.svd`` of the whole matrix, truncated. Cost O(m·n·min(m, n)).
* ``randomized``: seeded randomized block Krylov iteration (Musco & Musco 2015) with block size
  ``l = k + p`` (oversampling ``p``), run as a block Golub–Kahan recursion with full
  re-orthogonalisation and thick restart to the top ``2l`` Ritz vectors (Baglama & Reichel 2005); the
  top-k Ritz subspace is compared with the previous step's, and the loop stops once the estimated
  distance to the exact top-k subspace is ≤ ``tol`` or after ``max_iter`` steps. Cost per step: two
  products with the weight, O(m·n·l), plus O((m + n)·l² + l³). The last step's ``1 − Φ(previous, current)`` is kept
  as ``subspace_change``, and the estimated distance (largest principal-angle sine) as
  ``uncertainty`` (:func:`_uncertainty`): a flat spectrum converges slower and its top-k subspace is
  barely defined, so the basis says how far it may be off. Earlier versions (``ALGORITHM_VERSION`` ≤ 2)
  used subspace iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4), which took 13–16 iterations
  on a power-law spectrum for a 6e-3 error of the projected update where this takes 5–6 steps for
  ≤ 3e-4 (bench/results-accuracy.md).

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
#: dtypes bases may be held and cached in (``BasisSettings.cache_dtype``)
CACHE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: Bump when anything that changes a basis changes; it is part of every cache key.
ALGORITHM_VERSION = 4  # 4: exact where the restarted Krylov space would fill the matrix (cached v3 bases there were not orthonormal); 3: thick-restarted block Krylov, tol on the estimated distance; 2: bases carry their uncertainty


@dataclass(frozen=True)
class BasisSettings:
    """Everything besides the weight itself that changes a computed basis (part of the cache key)."""

    method: Method = "auto"
    oversample: int = 16
    max_iter: int = 24
    #: stop once the estimated sin θ_max to the exact top-k subspace (``Basis.uncertainty``) is ≤ tol
    tol: float = 1e-3
    seed: int = 0
    compute_dtype: torch.dtype = torch.float32
    #: one CPU thread for every basis and projection, so the bits do not depend on the thread count
    deterministic: bool = False
    #: precision ``U`` and ``V`` are held in (and cached in): ``None`` = the compute dtype; float16 or
    #: bfloat16 round them once after computing, so a cold, a warm and an uncached run give the same bits
    cache_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.cache_dtype is not None and self.cache_dtype not in CACHE_DTYPES.values():
            raise ValueError(f"cache dtype must be one of {', '.join(CACHE_DTYPES)}, got {self.cache_dtype}")

    @property
    def stored_dtype(self) -> torch.dtype:
        """The dtype ``U`` and ``V`` are rounded to and cached in."""
        return self.cache_dtype if self.cache_dtype is not None else self.compute_dtype

    def key(self) -> str:
        dt = str(self.compute_dtype).removeprefix("torch.")
        det = "-det" if self.deterministic else ""
        held = "" if self.stored_dtype == self.compute_dtype else "-c" + str(self.stored_dtype).removeprefix("torch.")
        return f"v{ALGORITHM_VERSION}-{self.method}-p{self.oversample}-it{self.max_iter}-tol{self.tol:g}-s{self.seed}-{dt}{det}{held}"


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
    SVD over ``[B, m, l]``; each item runs its own Krylov steps and stops on its own test, from
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
    return [held_as(b, settings) for b in _compute(stacked, k, settings, dev, own)]


def held_as(basis: Basis, settings: BasisSettings) -> Basis:
    """``basis`` with ``U`` and ``V`` rounded to ``settings.stored_dtype`` and back to the compute dtype
    (unchanged when they are the same): what the cache holds, so cached and fresh bases are equal."""
    held = settings.stored_dtype
    if held == basis.U.dtype:
        return basis
    return Basis(basis.U.to(held).to(basis.U.dtype), basis.S, basis.V.to(held).to(basis.V.dtype), basis.shape, basis.method,
                 basis.iterations, basis.subspace_change, basis.uncertainty)


def _compute(stacked: Tensor, k: int, settings: BasisSettings, dev: torch.device, own: list[tuple[int, ...]]) -> list[Basis]:
    """:func:`compute_bases` on a linalg-capable device, before rounding to the held dtype."""
    A = stacked.detach().to(device=dev, dtype=settings.compute_dtype)
    _, m, n = A.shape
    if not 1 <= k < min(m, n) + 1:
        raise ValueError(f"k={k} is outside [1, {min(m, n)}] for a {m}×{n} weight")
    l = min(k + settings.oversample, min(m, n))
    method = settings.method
    if method == "auto":
        method = "exact" if 2 * l >= min(m, n) else "randomized"
    if method == "randomized":
        l = min(l, min(m, n) // 2)  # a Krylov space of at least two blocks must fit
        if l < k or 3 * l >= min(m, n):
            # k > min(m, n) / 2, or the restarted space (c + l = 3l vectors, see _randomized) would span
            # all of R^min(m, n): nothing to save, and once it does, the next Krylov block holds only
            # rounding noise, whose QR is not orthogonal to the kept vectors (Φ above 1 was seen)
            method = "exact"
    if method == "exact":
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        return [Basis(U[i, :, :k].contiguous(), S[i, :k].contiguous(), Vh[i, :k].T.contiguous(), own[i], "exact") for i in range(A.shape[0])]
    return _randomized(A, k, l, settings, own)


def _randomized(A: Tensor, k: int, l: int, settings: BasisSettings, shapes: list[tuple[int, ...]]) -> list[Basis]:
    """Randomized block Krylov iteration (Musco & Musco 2015) with thick restart (Baglama & Reichel
    2005) on a batch ``A`` ``[B, m, n]``, each item stopping on its own test.

    Kept: ``c`` Ritz triplets ``A W_c = Q_c Σ_c`` (``W_c`` ``n × c``, ``Q_c`` ``m × c`` orthonormal;
    ``c = min(2l, min(m, n) − l)``). A step extends the right space by the residuals of the top ``l``
    (the next Krylov direction), ``Z = Aᵀ Q_l − W_l Σ_l``, orthogonalised against ``W_c`` (twice) →
    ``W_+``; then ``A W_+ = Q_c C + Q_+ R_+`` (block Gram–Schmidt, twice), so
    ``A [W_c W_+] = [Q_c Q_+] [[Σ_c, C], [0, R_+]]`` and the SVD of that small ``(c + l)²`` matrix
    gives the new Ritz triplets, of which the top ``c`` are kept. A step costs two products with
    ``A`` (as one subspace iteration does) plus ``O((m + n)·(c + l)·l + (c + l)³)``; the unrestarted
    Krylov space (bench/accuracy.py) converges in slightly fewer steps but its small SVD grows each
    step and dominated the time. The previous top-k Ritz vectors are the first k coordinates, so
    ``sin θ_max(previous, current)`` is the norm of the rest of the new top-k coordinates. An item
    stops once its estimated distance to the exact subspace (:func:`_uncertainty`) is ≤ ``tol``, or
    after ``max_iter`` steps."""
    b, m, n = A.shape
    dt, dev = A.dtype, A.device
    c = min(2 * l, min(m, n) - l)
    # The test matrix is drawn on the CPU from a seeded generator, so the same seed gives the same
    # start on every device (and for every item of a batch).
    gen = torch.Generator(device="cpu").manual_seed(settings.seed)
    omega = torch.randn(n, l, generator=gen, dtype=settings.compute_dtype).to(dev)
    X = torch.linalg.qr(omega)[0].expand(b, n, l).contiguous()
    Q, R = torch.linalg.qr(A @ X)  # B × m × l, B × l × l
    Ur, S, Vh = torch.linalg.svd(R)
    W, Q = X @ Vh.mT, Q @ Ur  # the first Ritz triplets: A W = Q diag(S)
    out: list[Basis | None] = [None] * b
    last = [1.0] * b  # the previous step's sin θ_max(previous, current) of each item
    active = list(range(b))  # the batch rows of A, Q, W, S belong to these items
    for it in range(1, settings.max_iter + 1):
        Z = A.mT @ Q[..., :l] - W[..., :l] * S[..., None, :l]  # residuals of the top l: the next Krylov direction
        for _ in range(2):
            Z = Z - W @ (W.mT @ Z)
        Wn = torch.linalg.qr(Z)[0]
        # once the top Ritz vectors converge Z is small, and its QR magnifies what is left of W in it:
        # project once more after normalising (V drifted 1e-3 from orthonormal over 24 steps without)
        Wn = torch.linalg.qr(Wn - W @ (W.mT @ Wn))[0]
        Y = A @ Wn
        C = Q.mT @ Y
        Y = Y - Q @ C
        C2 = Q.mT @ Y
        Y = Y - Q @ C2
        Qn, Rn = torch.linalg.qr(Y)
        c0 = Q.shape[-1]
        R = torch.cat([torch.cat([torch.diag_embed(S), C + C2], -1), torch.cat([torch.zeros(len(active), l, c0, dtype=dt, device=dev), Rn], -1)], -2)
        Ur, S, Vh = torch.linalg.svd(R)
        # the previous top-k Ritz vectors are the first k coordinates: the cosines of the principal
        # angles are the singular values of Ur[:k, :k], and sin θ_max = ‖Ur[k:, :k]‖₂ (the residual itself;
        # 1 − cos² would lose it to rounding below ~1e-3)
        ch = (1.0 - Ur[..., :k, :k].square().sum((-2, -1)) / k).clamp_min(0.0).tolist()
        sin = torch.linalg.matrix_norm(Ur[..., k:, :k], ord=2).tolist()
        still = []
        for j, i in enumerate(active):
            unc = _uncertainty(sin[j], last[i])
            last[i] = sin[j]
            if unc <= settings.tol or it == settings.max_iter:  # only its top k are formed
                U = Q[j] @ Ur[j, :c0, :k] + Qn[j] @ Ur[j, c0:, :k]
                V = W[j] @ Vh[j, :k, :c0].T + Wn[j] @ Vh[j, :k, c0:].T
                out[i] = Basis(U, S[j, :k].contiguous(), V, shapes[i], "randomized", it, ch[j], unc)
            else:
                still.append(j)
        if not still:
            break
        if len(still) < len(active):
            idx = torch.tensor(still, device=dev)
            A, Q, Qn, W, Wn, Ur, S, Vh = (t.index_select(0, idx) for t in (A, Q, Qn, W, Wn, Ur, S, Vh))
            active = [active[j] for j in still]
        keep = min(c, c0 + l)  # restart: the top c Ritz triplets
        W = torch.cat([W, Wn], -1) @ Vh[..., :keep, :].mT
        Q = torch.cat([Q, Qn], -1) @ Ur[..., :keep]
        S = S[..., :keep]
    return [b_ for b_ in out if b_ is not None]


def _uncertainty(step: float, before: float) -> float:
    """The estimated ``sin θ_max`` between a randomized top-k subspace and the exact one.

    ``step``: the last step's ``sin θ_max(previous, current)``; ``before``: the one of the step
    before. With the observed rate ``r = step / before`` (at most 0.9: the noise floor of rounding
    makes late steps look stagnant) the distance left is the geometric tail ``step · r / (1 − r)``;
    capped at 1. bench/accuracy.py checks it against the exact subspace.
    """
    if step <= 0.0:
        return 0.0
    r = min(0.9, step / before) if before > 0.0 else 0.9
    return min(1.0, step * r / (1.0 - r))
