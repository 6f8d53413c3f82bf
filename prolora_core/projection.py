"""Projection of a LoRA update onto the target's subspace and null space, in factored form.

A LoRA is ``ΔW = s · B A`` with ``B`` (up) ``m × r`` and ``A`` (down) ``r × n``. With the source
bases ``U_s, V_s`` and the target bases ``U_t, V_t`` (top-k, orthonormal) the modes are:

``copy``         ``ΔW``, unchanged (the baseline).
``subspace``     ``P_Ut ΔW_∥ P_Vt`` with ``ΔW_∥ = P_Us ΔW P_Vs`` (the paper's "w/o null space" ablation).
``prolora``      Eq. 3: ``P_Ut ΔW_∥ P_Vt + P_Ut⊥ ΔW_⊥ P_Vt⊥`` with ``ΔW_⊥ = P_Us⊥ ΔW P_Vs⊥``.
                 Factors ``[B_∥ B_⊥] [A_∥; A_⊥]``: rank ≤ 2r.
``prolora-full`` all four terms: ``(P_Ut P_Us + P_Ut⊥ P_Us⊥) ΔW (P_Vs P_Vt + P_Vs⊥ P_Vt⊥)``.
                 Rank ≤ r, and exactly ``ΔW`` back when target = source.
``casa``         cluster-aware spectral arbitration (:mod:`.casa`): needs the source and target
                 weights themselves, not only bases, so it is not one of the maps below.
``auto``         ``casa`` or ``copy`` for a whole LoRA, from the median relative departure
                 ``‖W_t − W_s‖ / ‖W_s‖`` of its modules (:mod:`.auto`); not a map of bases either.

No ``m × n`` matrix is formed: every step costs O((m + n)·k·r). Updates that exist only densely
(LoHa, LoKr, full diffs) go through :func:`project_dense`, the same maps applied to ``ΔW`` itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .basis import Basis
from .linalg import project_left, project_left_perp, project_right, project_right_perp

Mode = Literal["prolora", "prolora-full", "subspace", "copy", "casa", "auto"]
MODES: tuple[Mode, ...] = ("prolora", "prolora-full", "subspace", "copy", "casa", "auto")
#: Modes that are maps of bases (:func:`project`, :func:`project_dense`).
BASIS_MODES: tuple[Mode, ...] = ("prolora", "prolora-full", "subspace", "copy")


@dataclass(frozen=True)
class Factors:
    """A factored update ``ΔW = scale · up @ down`` with ``up`` ``m × r`` and ``down`` ``r × n`` (2-D)."""

    up: Tensor
    down: Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def dense(self) -> Tensor:
        """``scale · up @ down`` (for tests and small reports only)."""
        return self.scale * (self.up @ self.down)

    def frobenius_norm(self) -> float:
        """``‖scale · up @ down‖_F`` without forming the product: ``√tr((upᵀup)(down downᵀ))``."""
        up64, down64 = self.up.double(), self.down.double()
        gram = (up64.T @ up64) * (down64 @ down64.T)  # elementwise: Σ_ij (UᵀU)_ij (DDᵀ)_ij = tr(UᵀU DDᵀ)
        return abs(self.scale) * float(gram.sum().clamp_min(0.0).sqrt())


def project(lora: Factors, source: Basis, target: Basis, mode: Mode) -> Factors:
    """Transfer the factored update ``lora`` from the source bases to the target bases.

    The bases must have the same k and the same matrix shape as ``lora`` (``m × n``); the result
    is on the bases' device, in their dtype.
    """
    if mode == "copy":
        return lora
    if mode not in BASIS_MODES:
        raise ValueError(f"mode {mode!r} is not a projection of bases; choose one of {', '.join(BASIS_MODES)}")
    dev, dt = source.U.device, source.U.dtype
    B, A = lora.up.to(dev, dt), lora.down.to(dev, dt)
    Us, Vs, Ut, Vt = source.U, source.V, target.U.to(dev, dt), target.V.to(dev, dt)
    if B.shape[0] != Us.shape[0] or A.shape[1] != Vs.shape[0]:
        raise ValueError(f"LoRA is {B.shape[0]}×{A.shape[1]} but the bases are {Us.shape[0]}×{Vs.shape[0]}")
    if mode == "subspace":
        return Factors(project_left(Ut, project_left(Us, B)), project_right(project_right(A, Vs), Vt), lora.scale)
    # Each side once through the source basis: P = P_Us B, B₁ = P_Us⊥ B = B − P (and A's alike).
    # prolora:      B_∥ = P_Ut P,  B_⊥ = P_Ut⊥ B₁ = B₁ − Ut Utᵀ B₁  (Utᵀ [P B₁] in one product);
    # prolora-full: B_∥ + B_⊥ = B₁ + Ut Utᵀ (P − B₁).
    # 6 (prolora) or 4 (prolora-full) products of m·k·r per side instead of 8.
    P = Us @ (Us.T @ B)
    B1 = B - P
    Q = A @ Vs @ Vs.T
    A1 = A - Q
    if mode == "prolora":
        r = B.shape[1]
        left = Ut @ (Ut.T @ torch.cat([P, B1], dim=1))
        right = torch.cat([Q, A1], dim=0) @ Vt @ Vt.T
        return Factors(torch.cat([left[:, :r], B1 - left[:, r:]], dim=1), torch.cat([right[:r], A1 - right[r:]], dim=0), lora.scale)
    return Factors(B1 + Ut @ (Ut.T @ (P - B1)), A1 + ((Q - A1) @ Vt) @ Vt.T, lora.scale)


def project_dense(delta: Tensor, source: Basis, target: Basis, mode: Mode) -> Tensor:
    """:func:`project` for a dense ``m × n`` update: the left maps on ``ΔW``, then the right maps
    (O(m·n·k)); the result is on the bases' device, in their dtype."""
    if mode == "copy":
        return delta
    if mode not in BASIS_MODES:
        raise ValueError(f"mode {mode!r} is not a projection of bases; choose one of {', '.join(BASIS_MODES)}")
    dev, dt = source.U.device, source.U.dtype
    D = delta.to(dev, dt)
    Us, Vs, Ut, Vt = source.U, source.V, target.U.to(dev, dt), target.V.to(dev, dt)
    if D.shape != (Us.shape[0], Vs.shape[0]):
        raise ValueError(f"update is {D.shape[0]}×{D.shape[1]} but the bases are {Us.shape[0]}×{Vs.shape[0]}")
    left_par = project_left(Ut, project_left(Us, D))
    left_perp = project_left_perp(Ut, project_left_perp(Us, D))
    if mode == "subspace":
        return project_right(project_right(left_par, Vs), Vt)
    if mode == "prolora":
        return project_right(project_right(left_par, Vs), Vt) + project_right_perp(project_right_perp(left_perp, Vs), Vt)
    left = left_par + left_perp
    return project_right(project_right(left, Vs), Vt) + project_right_perp(project_right_perp(left, Vs), Vt)


@dataclass(frozen=True)
class Recompressed:
    factors: Factors
    energy_dropped: float  # Σ dropped σ² / Σ σ² of the update, in [0, 1]


def recompress(lora: Factors, rank: int) -> Recompressed:
    """Best rank-``rank`` approximation of ``scale · up @ down``, exactly, in factored form.

    QR of both factors, SVD of the small ``r × r`` core; the singular values are split evenly
    between the new factors (``√σ``) and the scale is kept.
    """
    if rank <= 0:
        raise ValueError(f"output rank must be positive, got {rank}")
    Qu, Ru = torch.linalg.qr(lora.up)
    Qd, Rd = torch.linalg.qr(lora.down.T)
    Uc, S, Vch = torch.linalg.svd(Ru @ Rd.T)
    total = float(S.double().square().sum())
    keep = min(rank, int(S.shape[0]))
    dropped = float(S[keep:].double().square().sum()) / total if total > 0 else 0.0
    root = S[:keep].sqrt()
    up = (Qu @ Uc[:, :keep]) * root
    down = root[:, None] * (Vch[:keep] @ Qd.T)
    return Recompressed(Factors(up, down, lora.scale), dropped)
