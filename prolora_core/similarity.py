"""Subspace similarity Φ between the bases of a source and a target weight (the paper's filter).

``Φ_U = ‖U_sᵀ U_t‖_F² / k`` ∈ [0, 1] and ``Φ_V`` likewise. Two random k-dim subspaces of a
d-dim space give ``E[Φ] = k / d`` (the chance level), so Φ is reported next to it.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .basis import Basis


def subspace_similarity(A: Tensor, B: Tensor) -> float:
    """``‖Aᵀ B‖_F² / k`` for two orthonormal ``d × k`` bases (k = the smaller column count)."""
    if A.shape[0] != B.shape[0]:
        raise ValueError(f"bases live in different spaces: {A.shape[0]} vs {B.shape[0]} rows")
    k = min(A.shape[1], B.shape[1])
    B = B.to(device=A.device, dtype=A.dtype)
    return float((A.T @ B).square().sum()) / k


@dataclass(frozen=True)
class Similarity:
    """Φ on both sides of one module pair, with the chance level of each side."""

    phi_u: float
    phi_v: float
    chance_u: float
    chance_v: float

    def passes(self, threshold: float) -> bool:
        """A module transfers when both Φ reach the threshold."""
        return self.phi_u >= threshold and self.phi_v >= threshold

    @property
    def phi(self) -> float:
        """The smaller of the two sides: the one the threshold is decided by."""
        return min(self.phi_u, self.phi_v)


def basis_similarity(source: Basis, target: Basis) -> Similarity:
    """Φ_U and Φ_V of two bases of the same matrix shape and the same k."""
    if source.dims != target.dims:
        raise ValueError(f"source weight is {source.dims[0]}×{source.dims[1]}, target is {target.dims[0]}×{target.dims[1]}")
    k = min(source.k, target.k)
    m, n = source.dims
    return Similarity(
        phi_u=subspace_similarity(source.U[:, :k], target.U[:, :k]),
        phi_v=subspace_similarity(source.V[:, :k], target.V[:, :k]),
        chance_u=k / m,
        chance_v=k / n,
    )
