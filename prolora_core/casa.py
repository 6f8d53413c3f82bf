"""CASA, cluster-aware spectral arbitration (arXiv 2605.01929), for one module: a LoRA update moved
from a source weight to a target weight that departs from it (a distilled "turbo", a fine-tune),
written from the paper's description.

Shapes: the update ``ΔW``, the source weight ``W_s`` and the target weight ``W_t`` are ``m × n``
(conv weights as ``out × in·kh·kw``); ``d = min(m, n)``. With the thin SVD ``W_s = U_s diag(σ) V_sᵀ``
(``U_s`` ``m × d``, ``V_s`` ``n × d``, ``σ`` descending) the update and the target's departure are
written in the source's singular coordinates (both ``d × d``)::

    C_s = U_sᵀ ΔW V_s            C_d = U_sᵀ (W_t − W_s) V_s

1. **Top directions.** ``k`` = the fewest leading directions holding ``energy`` (0.9) of ``Σσ²``.
2. **Groups.** Inside the top ``k``, directions ``i ≠ j`` are joined when the LoRA would rotate
   them into each other, ``|C_s[i, j]| / |σ_i − σ_j| > τ`` (τ = 0.5; first-order perturbation:
   the rotation angle between singular vectors ``i`` and ``j``); the groups are the connected
   components of that graph (either ordering of ``(i, j)`` makes an edge).
3. **Dense groups.** The departure's density of a group ``g`` is, on the output side, the mean
   over ``i ∈ g`` of ``‖C_d[i, :k]‖₂`` and on the input side the mean over ``j ∈ g`` of
   ``‖C_d[:k, j]‖₂``. A group is *dense* on a side when its density is at least the ρ-quantile
   (ρ = 0.5, linear interpolation) of the densities of all groups on that side. The *protected*
   entries of the ``d × d`` coordinates are those whose row lies in an output-dense group or whose
   column lies in an input-dense group (a cross of rows and columns; directions outside the top
   ``k`` are never dense).
4. **Write.** Outside the protected entries ``C = C_s − C_d``: there ``W_t + ΔW_t = W_s + ΔW``,
   source + LoRA behaviour restored. Inside them ``C = C_s``, except where LoRA and departure agree
   in sign and their score is high: score ``= |C_s[i, j] · C_d[i, j]| · cos(g_i, g_j)`` with the
   cosine between ``C_s`` and ``C_d`` over the block of groups ``(g_i, g_j)`` when both ``i, j < k``
   and 1 otherwise; entries whose score is above the ``arbitrate_q``-quantile (0.85) of the scores
   of those same-sign protected entries are *arbitrated*: ``C = (C_s if |C_s| > |C_d| else C_d) − C_d``,
   so an effect the target already carries is not applied twice.
5. **Back and re-compress.** ``ΔW_t = U_s C V_sᵀ`` (+ the part outside the thin bases, below), then
   its best rank-``rank`` approximation (exact SVD, :func:`.adapters.refactor`; the engine's
   default rank is the input LoRA's) with the share of ``‖ΔW_t‖_F²`` kept reported.

**Choices where the description is open** (the public code differs in places):

* The 90 % energy rule is applied to every shape (the public code uses all ``d`` directions for
  non-square weights).
* Non-square weights: the thin bases leave a part of ``ΔW`` outside ``span(U_s) ⊗ span(V_s)``
  (for ``m > n`` the rows in ``span(U_s)⊥``, for ``m < n`` the columns in ``span(V_s)⊥``). There the
  same cross rule is applied through the side that has coordinates, which does not depend on how
  a basis of the complement is chosen: for ``m > n`` ``P_Us⊥ (ΔW − (W_t − W_s) V_s diag(1 − c) V_sᵀ)``,
  for ``m < n`` ``(ΔW − U_s diag(1 − r) U_sᵀ (W_t − W_s)) P_Vs⊥`` with ``r``/``c`` the protected
  row/column indicators. Arbitration, elementwise and so basis-dependent there, is not applied in
  the complement.
* Quantiles of the arbitration scores are exact (sorted), never sampled.

With ``W_t = W_s`` (``C_d = 0``) every group has density 0, all are dense, no score is above the
threshold, and ``ΔW_t = ΔW`` before re-compression.

Computed on ``device`` (default: CUDA when present), in float64 on the CPU for weights up to 4 M
entries and float32 otherwise. Memory: a few ``m × n`` and ``d × d`` matrices for one module.
The source's thin SVD (:func:`source_svd`) is the costly step (SDXL's touched weights: minutes on
two cores); :class:`.full_bases.FullBases` computes it once per weight, keeps it in the basis cache
(its own entry kind) and in memory within a byte budget, and passes it in as ``svd``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .adapters import refactor
from .errors import ProLoRAError
from .linalg import as_matrix, linalg_device, resolve_device
from .projection import Factors

#: Weights up to this many entries are computed in float64 on the CPU.
CPU_FLOAT64_MAX = 1 << 22


@dataclass(frozen=True)
class CasaSettings:
    """CASA's parameters: ``energy`` (share of Σσ² of the top directions, (0, 1]), ``tau`` (rotation
    threshold τ > 0), ``rho`` (density quantile ρ ∈ [0, 1]), ``arbitrate_q`` (score quantile ∈ [0, 1])."""

    energy: float = 0.9
    tau: float = 0.5
    rho: float = 0.5
    arbitrate_q: float = 0.85

    def __post_init__(self) -> None:
        if not 0.0 < self.energy <= 1.0:
            raise ProLoRAError(f"CASA energy must lie in (0, 1], got {self.energy}")
        if not self.tau > 0.0:
            raise ProLoRAError(f"CASA rotation threshold τ must be positive, got {self.tau}")
        for name, q in (("density quantile ρ", self.rho), ("arbitration quantile", self.arbitrate_q)):
            if not 0.0 <= q <= 1.0:
                raise ProLoRAError(f"CASA {name} must lie in [0, 1], got {q}")


@dataclass(frozen=True)
class CasaResult:
    """One module's CASA output: ``delta`` (``m × n`` before re-compression, compute dtype),
    ``factors`` (rank-``rank``, float32 on the CPU), ``energy_kept`` (share of ``‖delta‖_F²`` in them),
    ``k`` top directions, ``groups`` among them, ``protected_rows`` / ``protected_cols`` (directions
    in dense groups), ``arbitrated`` (entries arbitrated)."""

    delta: Tensor
    factors: Factors
    energy_kept: float
    k: int
    groups: int
    protected_rows: int
    protected_cols: int
    arbitrated: int


def compute_dtype(m: int, n: int, device: torch.device) -> torch.dtype:
    return torch.float64 if device.type == "cpu" and m * n <= CPU_FLOAT64_MAX else torch.float32


def source_svd(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The thin SVD ``w = U diag(S) Vᵀ`` of an ``m × n`` matrix in its own dtype and device: ``U``
    ``m × d``, ``S`` ``d`` (descending), ``V`` ``n × d``, ``d = min(m, n)``, ``U`` and ``V`` contiguous
    (so a cached copy multiplies bitwise like a fresh one)."""
    m, n = w.shape
    if m < n:  # LAPACK is several times slower on wide matrices (3072 × 12288: 8.3 s vs 2.8 s, 16 threads)
        P, S, Qh = torch.linalg.svd(w.T, full_matrices=False)
        U, V = Qh.T, P
    else:
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        V = Vh.T
    return U.contiguous(), S.contiguous(), V.contiguous()


def casa_update(delta: Tensor, w_source: Tensor, w_target: Tensor, rank: int | None, settings: CasaSettings = CasaSettings(),
                device: torch.device | str | None = None, svd: tuple[Tensor, Tensor, Tensor] | None = None) -> CasaResult:
    """CASA for one module (see the module docstring): ``delta`` is the LoRA's dense ``ΔW``
    (``m × n``, strength and ``alpha / rank`` included), ``w_source`` / ``w_target`` the base weights
    (any float dtype; conv weights are flattened). Returns ``ΔW_t`` and its rank-``rank`` factors
    (``rank=None``: :func:`.adapters.refactor`'s rule, the fewest directions keeping 99.9 %, ≤ 64).
    ``svd``: ``W_s``'s thin SVD ``(U, S, V)`` in the compute dtype (:func:`compute_dtype`), as
    :func:`source_svd` gives it (e.g. from :class:`.full_bases.FullBases`, the basis cache); the
    result is then bitwise that of computing it here. ``None``: computed here.

    Raises :class:`ProLoRAError` when the shapes disagree, ``svd`` does not fit or ``rank`` is not positive."""
    if rank is not None and rank <= 0:
        raise ProLoRAError(f"output rank must be positive, got {rank}")
    dev = linalg_device(resolve_device(device))
    D0 = as_matrix(delta.detach())
    m, n = D0.shape
    if as_matrix(w_source).shape != (m, n) or as_matrix(w_target).shape != (m, n):
        raise ProLoRAError(f"CASA needs ΔW, W_s and W_t of one shape; got {tuple(D0.shape)}, "
                           f"{tuple(as_matrix(w_source).shape)} and {tuple(as_matrix(w_target).shape)}")
    dt = compute_dtype(m, n, dev)
    D = D0.to(dev, dt)
    Ws = as_matrix(w_source.detach()).to(dev, dt)
    dep = as_matrix(w_target.detach()).to(dev, dt) - Ws  # W_t − W_s
    d = min(m, n)
    if svd is None:
        U, S, V = source_svd(Ws)
    else:
        U, S, V = (t.to(dev) for t in svd)
        if tuple(U.shape) != (m, d) or tuple(S.shape) != (d,) or tuple(V.shape) != (n, d) or not U.dtype == S.dtype == V.dtype == dt:
            raise ProLoRAError(f"CASA's precomputed source SVD must be U {m} × {d}, S {d}, V {n} × {d} in {dt}; got "
                               f"{tuple(U.shape)}, {tuple(S.shape)}, {tuple(V.shape)} in {U.dtype}")
    Cs, Cd = U.T @ D @ V, U.T @ dep @ V
    C, rows, cols, info = arbitrate(Cs, Cd, S, settings)
    out = U @ C @ V.T
    keep_r, keep_c = (~rows).to(dt), (~cols).to(dt)  # 1 − r, 1 − c
    if m > n:  # rows in span(U_s)⊥: the column rule through V_s
        X = D - ((dep @ V) * keep_c) @ V.T
        out = out + X - U @ (U.T @ X)
    elif m < n:  # columns in span(V_s)⊥: the row rule through U_s
        X = D - U @ (keep_r[:, None] * (U.T @ dep))
        out = out + X - (X @ V) @ V.T
    rf = refactor(out, rank)
    return CasaResult(out, rf.factors, rf.energy_kept, *info)


def arbitrate(Cs: Tensor, Cd: Tensor, sigma: Tensor, settings: CasaSettings = CasaSettings()) -> tuple[Tensor, Tensor, Tensor, tuple[int, int, int, int, int]]:
    """Steps 1–4 on the ``d × d`` coordinates: the new coordinates ``C``, the protected row and
    column indicators (bool, length ``d``) and ``(k, groups, protected rows, protected cols, arbitrated)``."""
    d = int(sigma.shape[0])
    energy = sigma.square()
    total = float(energy.sum())
    if total > 0:
        reached = (energy.cumsum(0) / total) >= settings.energy - 1e-12
        k = int(reached.int().argmax()) + 1 if bool(reached.any()) else d
    else:
        k = d
    labels = components(rotation_graph(Cs[:k, :k], sigma[:k], settings.tau))
    groups = int(labels.max()) + 1
    M = torch.nn.functional.one_hot(labels, groups).to(Cs.dtype).T  # groups × k membership
    size = M.sum(1)
    dens_r = (M @ Cd[:k, :k].norm(dim=1)) / size
    dens_c = (M @ Cd[:k, :k].norm(dim=0)) / size
    dense_r = dens_r >= torch.quantile(dens_r, settings.rho)
    dense_c = dens_c >= torch.quantile(dens_c, settings.rho)
    rows = torch.zeros(d, dtype=torch.bool, device=Cs.device)
    cols = torch.zeros(d, dtype=torch.bool, device=Cs.device)
    rows[:k], cols[:k] = dense_r[labels], dense_c[labels]
    protected = rows[:, None] | cols[None, :]
    # Scores: |C_s C_d| times the block cosine inside the top k (1 outside).
    Csk, Cdk = Cs[:k, :k], Cd[:k, :k]
    dot = M @ (Csk * Cdk) @ M.T
    cos = dot / ((M @ Csk.square() @ M.T).sqrt() * (M @ Cdk.square() @ M.T).sqrt()).clamp_min(torch.finfo(Cs.dtype).tiny)
    factor = torch.ones_like(Cs)
    factor[:k, :k] = cos[labels][:, labels]
    score = (Cs * Cd).abs() * factor
    candidates = protected & (Cs.sign() == Cd.sign())
    C = torch.where(protected, Cs, Cs - Cd)
    arbitrated = 0
    if bool(candidates.any()):
        chosen = candidates & (score > quantile(score[candidates], settings.arbitrate_q))
        larger = torch.where(Cs.abs() > Cd.abs(), Cs, Cd)
        C = torch.where(chosen, larger - Cd, C)
        arbitrated = int(chosen.sum())
    return C, rows, cols, (k, groups, int(rows.sum()), int(cols.sum()), arbitrated)


def rotation_graph(Cs: Tensor, sigma: Tensor, tau: float) -> Tensor:
    """Edges ``i–j`` (symmetric bool ``k × k``, no self-loops) where ``|C_s[i, j]| / |σ_i − σ_j| > τ``
    for either ordering; equal singular values with a non-zero coupling are always joined."""
    gap = (sigma[:, None] - sigma[None, :]).abs()
    force = Cs.abs()
    edge = force > tau * gap  # |C| / gap > τ without dividing by a zero gap
    edge = edge & (force > 0)
    edge = edge | edge.T
    edge.fill_diagonal_(False)
    return edge


def components(adj: Tensor) -> Tensor:
    """Connected components of a symmetric bool adjacency: labels ``0 … c−1`` (long), numbered in
    order of each component's first direction. Minimum-label propagation with pointer jumping:
    O(k²) per round, O(log k) rounds on typical graphs."""
    k = int(adj.shape[0])
    idx = torch.arange(k, device=adj.device)
    lab = idx.clone()
    while True:
        nb = torch.where(adj, lab[None, :], k).amin(dim=1)
        new = torch.minimum(lab, nb)
        while True:
            jumped = new[new]
            if torch.equal(jumped, new):
                break
            new = jumped
        if torch.equal(new, lab):
            break
        lab = new
    return torch.unique(lab, return_inverse=True)[1]


def quantile(x: Tensor, q: float) -> Tensor:
    """The ``q``-quantile of a 1-D tensor with linear interpolation (``torch.quantile``'s rule),
    by sorting, so without ``torch.quantile``'s size limit."""
    s = x.flatten().sort().values
    pos = q * (s.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, s.numel() - 1)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])
