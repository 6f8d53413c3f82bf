"""Independent dense float64 reference of the four projection modes (numpy, explicit projectors).

Deliberately written without the engine's code: full SVD, explicit m×m / n×n projectors, dense ΔW.
"""
from __future__ import annotations

import numpy as np


def as_matrix(w: np.ndarray) -> np.ndarray:
    return w.reshape(w.shape[0], -1)


def top_bases(w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    U, _, Vt = np.linalg.svd(as_matrix(np.asarray(w, dtype=np.float64)), full_matrices=True)
    return U[:, :k], Vt[:k].T


def reference_transfer(delta: np.ndarray, w_source: np.ndarray, w_target: np.ndarray, k: int, mode: str) -> np.ndarray:
    """Dense ``ΔW_t←s`` (m × n) for ``delta`` = the source LoRA's dense update (m × n)."""
    delta = np.asarray(delta, dtype=np.float64)
    if mode == "copy":
        return delta
    Us, Vs = top_bases(w_source, k)
    Ut, Vt = top_bases(w_target, k)
    m, n = delta.shape
    PUs, PVs, PUt, PVt = Us @ Us.T, Vs @ Vs.T, Ut @ Ut.T, Vt @ Vt.T
    Im, In = np.eye(m), np.eye(n)
    par = PUs @ delta @ PVs
    perp = (Im - PUs) @ delta @ (In - PVs)
    if mode == "subspace":
        return PUt @ par @ PVt
    if mode == "prolora":
        return PUt @ par @ PVt + (Im - PUt) @ perp @ (In - PVt)
    if mode == "prolora-full":
        return (PUt @ PUs + (Im - PUt) @ (Im - PUs)) @ delta @ (PVs @ PVt + (In - PVs) @ (In - PVt))
    raise ValueError(mode)


def phi(A: np.ndarray, B: np.ndarray) -> float:
    return float(np.sum((A.T @ B) ** 2) / A.shape[1])


def gapped_weight(rng: np.random.Generator, m: int, n: int, k: int, gap: float = 100.0) -> np.ndarray:
    """A weight whose top-k singular values are ``gap`` times the rest (a clean spectral gap)."""
    U, _ = np.linalg.qr(rng.standard_normal((m, m)))
    V, _ = np.linalg.qr(rng.standard_normal((n, n)))
    d = min(m, n)
    s = np.concatenate([np.linspace(2.0, 1.0, k) * gap, np.linspace(1.0, 0.1, d - k)])
    return (U[:, :d] * s) @ V[:, :d].T


def power_law_weight(rng: np.random.Generator, m: int, n: int, exponent: float = 0.5) -> np.ndarray:
    """σ_i ∝ i^−exponent: closer to trained weights, no gap anywhere."""
    U, _ = np.linalg.qr(rng.standard_normal((m, m)))
    V, _ = np.linalg.qr(rng.standard_normal((n, n)))
    d = min(m, n)
    s = np.arange(1, d + 1, dtype=np.float64) ** -exponent
    return (U[:, :d] * s) @ V[:, :d].T
