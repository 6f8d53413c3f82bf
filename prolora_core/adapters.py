"""Adapter types: what one module's update is, how its dense ``ΔW`` is formed, and how a projected
update is turned back into something ComfyUI loads. Semantics exactly as ComfyUI's
``comfy.weight_adapter`` and ``comfy.lora.load_lora``:

* LoRA / LoCon (:class:`LoraModule`): ``ΔW = alpha/r · up @ down``, r = rows of ``down``. A Tucker
  core ``lora_mid`` (``[r, r, kh, kw]``) is folded into ``down`` when the file is read
  (:func:`fold_tucker`), leaving a plain LoCon module. Projected in factored form.
* LoHa (:class:`LoHa`): ``ΔW = alpha/r · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)``, r = rows of ``hada_w1_b``.
  With Tucker cores ``hada_t1``/``hada_t2`` (``[r, r, kh, kw]``; then ``w_a`` is ``[r, out]`` and
  ``w_b`` is ``[r, in]``) each factor is ``einsum('ijkl,jr,ip->prkl', t, w_b, w_a)`` (conv).
* LoKr (:class:`LoKr`): ``ΔW = s · w1 ⊗ w2``, each side stored whole or as ``a @ b``;
  ``s = alpha / dim`` with dim the rows of ``lokr_w2_b`` (else of ``lokr_w1_b``), and 1 when
  both sides are whole or there is no alpha. A 4-D ``w2`` makes a conv update. (A Tucker core
  ``lokr_t2`` is not an update ComfyUI 0.3.75 applies: see :mod:`.lora`.)
* Full difference (:class:`FullDiff`): ``ΔW = diff`` (a 2-D or 4-D ``.diff``).

The projection does not commute with ``⊙`` or ``⊗``: LoHa, LoKr and diff modules are projected as
their dense ``ΔW`` (float32). A projected LoHa/LoKr is re-factored into a LoRA (:func:`refactor`),
a projected diff stays a diff. DoRA's magnitude vector follows the ratio rule
(:func:`dora_magnitude`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from .linalg import linalg_device
from .projection import Factors

#: The energy (Σσ²) a re-factored LoHa/LoKr keeps when no output rank is given, and the rank cap.
ENERGY_KEPT = 0.999
MAX_REFACTOR_RANK = 64


@dataclass(frozen=True)
class LoraModule:
    """A LoRA/LoCon update: ``ΔW = (alpha / r) · up @ down`` in the module's own shape.

    ``up`` is ``[m, r]`` or ``[out, r, 1, 1]``; ``down`` is ``[r, n]`` or ``[r, in, kh, kw]``.
    """

    kind: ClassVar[str] = "lora"
    name: str
    up: Tensor
    down: Tensor
    alpha: float | None
    up_key: str
    down_key: str

    @property
    def key(self) -> str:
        return self.up_key

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.ndim == 4

    @property
    def layout(self) -> tuple[int, ...]:
        """The update's own shape: ``(out, in, kh, kw)`` for conv, ``(m, n)`` for linear."""
        return (int(self.up.shape[0]), *(int(d) for d in self.down.shape[1:]))

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(m, n)`` of the update as a matrix."""
        n = 1
        for d in self.down.shape[1:]:
            n *= int(d)
        return int(self.up.shape[0]), n

    def factors(self, dtype: torch.dtype = torch.float32) -> Factors:
        """The 2-D factors in ``dtype`` (float32 or better for the math)."""
        return Factors(self.up.reshape(self.up.shape[0], -1).to(dtype), self.down.reshape(self.rank, -1).to(dtype), self.scale)

    def dense(self) -> Tensor:
        return self.factors().dense()


def fold_tucker(down: Tensor, mid: Tensor) -> Tensor:
    """``down'[o, i, h, w] = Σ_j down[j, i] · mid[o, j, h, w]``: a LoCon Tucker core folded into
    ``down`` (``[r, in, 1, 1]`` and ``[r, r, kh, kw]`` → ``[r, in, kh, kw]``), as ComfyUI's
    LoRAAdapter computes it (in float32; the result keeps ``down``'s dtype)."""
    folded = torch.einsum("ji,ojhw->oihw", down.reshape(down.shape[0], -1).float(), mid.float())
    return folded.to(down.dtype)


def tucker_factor(t: Tensor, b: Tensor, a: Tensor) -> Tensor:
    """``einsum('ijkl,jr,ip->prkl', t, b, a)`` in float32: a LyCORIS Tucker core ``t``
    ``[r, r, kh, kw]`` with ``b`` ``[r, in]`` and ``a`` ``[r, out]`` → ``[out, in, kh, kw]``, as
    ComfyUI's LoHa adapter forms it."""
    return torch.einsum("ijkl,jr,ip->prkl", t.float(), b.float(), a.float())


@dataclass(frozen=True)
class LoHa:
    """A LoHa update. ``parts`` holds the stored tensors by suffix (``.hada_w1_a`` …), 2-D each,
    plus the Tucker cores ``.hada_t1``/``.hada_t2`` when the file has them."""

    kind: ClassVar[str] = "loha"
    SUFFIXES: ClassVar[tuple[str, ...]] = (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b")
    TUCKER: ClassVar[tuple[str, ...]] = (".hada_t1", ".hada_t2")
    parts: dict[str, Tensor]
    alpha: float | None
    key: str

    @property
    def tucker(self) -> bool:
        return ".hada_t1" in self.parts

    @property
    def rank(self) -> int:
        return int(self.parts[".hada_w1_b"].shape[0])

    @property
    def matrix_shape(self) -> tuple[int, int]:
        a, b = self.parts[".hada_w1_a"], self.parts[".hada_w1_b"]
        if self.tucker:
            t = self.parts[".hada_t1"]
            return int(a.shape[1]), int(b.shape[1]) * int(t.shape[2]) * int(t.shape[3])
        return int(a.shape[0]), int(b.shape[1])

    def dense(self) -> Tensor:
        p = {s: t.float() for s, t in self.parts.items()}
        scale = 1.0 if self.alpha is None else self.alpha / self.rank
        if self.tucker:
            m1 = tucker_factor(p[".hada_t1"], p[".hada_w1_b"], p[".hada_w1_a"])
            m2 = tucker_factor(p[".hada_t2"], p[".hada_w2_b"], p[".hada_w2_a"])
            return (m1 * m2).reshape(m1.shape[0], -1) * scale
        return (p[".hada_w1_a"] @ p[".hada_w1_b"]) * (p[".hada_w2_a"] @ p[".hada_w2_b"]) * scale


@dataclass(frozen=True)
class LoKr:
    """A LoKr update. ``parts`` holds ``.lokr_w1`` or ``.lokr_w1_a``/``_b``, and ``.lokr_w2`` or
    ``.lokr_w2_a``/``_b``."""

    kind: ClassVar[str] = "lokr"
    parts: dict[str, Tensor]
    alpha: float | None
    key: str

    def side(self, i: int) -> Tensor:
        """``w1`` or ``w2`` (float32), formed from its factors when stored factored."""
        whole = self.parts.get(f".lokr_w{i}")
        if whole is not None:
            return whole.float()
        return self.parts[f".lokr_w{i}_a"].float() @ self.parts[f".lokr_w{i}_b"].float()

    @property
    def dim(self) -> int | None:
        """ComfyUI's ``dim``: rows of ``w2_b`` when w2 is factored, else of ``w1_b``, else none."""
        for s in (".lokr_w2_b", ".lokr_w1_b"):
            if s in self.parts:
                return int(self.parts[s].shape[0])
        return None

    @property
    def scale(self) -> float:
        return self.alpha / self.dim if self.alpha is not None and self.dim is not None else 1.0

    @property
    def rank(self) -> int:
        return self.dim or min(self.matrix_shape)

    def _shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        def shape(i: int) -> tuple[int, ...]:
            w = self.parts.get(f".lokr_w{i}")
            if w is not None:
                return tuple(w.shape)
            return int(self.parts[f".lokr_w{i}_a"].shape[0]), int(self.parts[f".lokr_w{i}_b"].shape[1])

        return shape(1), shape(2)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        (o1, i1), s2 = self._shapes()
        n2 = 1
        for d in s2[1:]:
            n2 *= int(d)
        return o1 * int(s2[0]), i1 * n2

    def dense(self) -> Tensor:
        w1, w2 = self.side(1), self.side(2)
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        m, _ = self.matrix_shape
        return torch.kron(w1, w2).reshape(m, -1) * self.scale


@dataclass(frozen=True)
class FullDiff:
    """A full weight difference ``.diff`` (2-D or 4-D), added as is."""

    kind: ClassVar[str] = "diff"
    diff: Tensor
    key: str
    alpha: float | None = None

    @property
    def matrix_shape(self) -> tuple[int, int]:
        n = 1
        for d in self.diff.shape[1:]:
            n *= int(d)
        return int(self.diff.shape[0]), n

    @property
    def rank(self) -> int:
        return min(self.matrix_shape)

    def dense(self) -> Tensor:
        return self.diff.reshape(self.diff.shape[0], -1).float()


#: A module's matrix update, whatever the adapter type: each has ``kind``, ``key`` (one of its keys,
#: for messages), ``alpha``, ``matrix_shape``, ``rank`` and ``dense()`` (float32 ``m × n``, scale included).
Update = LoraModule | LoHa | LoKr | FullDiff


@dataclass(frozen=True)
class Module:
    """One adapted module of a LoRA file: its matrix update (``None`` when it has only 1-D parts), an
    optional DoRA magnitude, and 1-D parts (``.diff_b``, ``.w_norm``, ``.b_norm``, a 1-D ``.diff``)
    that are carried over unchanged, by suffix."""

    name: str
    update: Update | None
    dora_scale: Tensor | None = None
    dora_key: str | None = None
    carried: dict[str, Tensor] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """A key of the module, for messages."""
        if self.update is not None:
            return self.update.key
        return self.name + next(iter(self.carried))

    @property
    def kind(self) -> str:
        return self.update.kind if self.update is not None else "none"

    def source_norm(self) -> float:
        """``‖ΔW‖_F`` of the update (0 without one)."""
        if self.update is None:
            return 0.0
        if isinstance(self.update, LoraModule):
            return self.update.factors().frobenius_norm()
        return float(self.update.dense().double().norm())


@dataclass(frozen=True)
class Refactored:
    factors: Factors
    energy_kept: float  # Σ kept σ² / Σ σ² of the update, in [0, 1]


def refactor(delta: Tensor, rank: int | None = None) -> Refactored:
    """A dense ``m × n`` update as LoRA factors: its best rank-r approximation (exact SVD).

    r = ``rank`` when given, else the smallest rank keeping at least 99.9 % of the energy (Σσ²),
    at most 64. The singular values are split evenly between the factors; the scale is 1.
    """
    m, n = delta.shape
    U, S, Vh = torch.linalg.svd(delta.to(linalg_device(delta.device), torch.float32), full_matrices=False)
    energy = S.double().square()
    total = float(energy.sum())
    if total == 0.0:
        return Refactored(Factors(torch.zeros(m, 1), torch.zeros(1, n), 1.0), 1.0)
    if rank is None:
        reached = (energy.cumsum(0) / total) >= ENERGY_KEPT
        rank = min(int(reached.int().argmax()) + 1, MAX_REFACTOR_RANK)
    r = min(rank, int(S.shape[0]))
    root = S[:r].sqrt()
    up, down = (U[:, :r] * root).cpu(), (root[:, None] * Vh[:r]).cpu()
    return Refactored(Factors(up, down, 1.0), float(energy[:r].sum()) / total)


def dora_on_output_axis(dora_scale: Tensor, weight_shape: tuple[int, ...]) -> bool:
    """ComfyUI's test in ``weight_decompose``: the magnitude is per output row when its first
    dimension is the weight's."""
    return int(dora_scale.shape[0]) == int(weight_shape[0])


def axis_norms(weight: Tensor, output_axis: bool) -> Tensor:
    """Column-wise norms as ComfyUI's ``weight_decompose`` takes them (float32): per output row
    (over input and kernel), or per input channel (over output and kernel)."""
    w = weight.float()
    if output_axis:
        return w.reshape(w.shape[0], -1).norm(dim=1)
    return w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)


def dora_magnitude(dora_scale: Tensor, w_source: Tensor, w_target: Tensor) -> Tensor:
    """The target's DoRA magnitude by the ratio rule: ``m_t = m_s ⊙ ‖W_t‖ / ‖W_s‖``.

    DoRA applies ``W' = m ⊙ (W + ΔW) / ‖·‖`` with the norm along one axis (ComfyUI's
    ``weight_decompose``). What a DoRA learns in ``m`` is a change of each column's magnitude
    relative to the base weight, ``m / ‖W_s‖`` (``m`` starts at ``‖W_s‖``); carrying ``m``
    unchanged would instead impose the source's absolute magnitudes on the target's columns. The
    ratio rule keeps the learned relative change: on the output axis ComfyUI divides by the base
    weight's own norm, so the per-row multiplier ``m_t / ‖W_t‖`` equals ``m_s / ‖W_s‖`` exactly,
    and target = source gives ``m_s`` back bit for bit. Norms are of the base weights along the
    same axis ComfyUI uses; a zero source norm keeps that entry unchanged. The result has
    ``dora_scale``'s shape and dtype.
    """
    out_axis = dora_on_output_axis(dora_scale, tuple(w_source.shape))
    ns, nt = axis_norms(w_source, out_axis), axis_norms(w_target, out_axis)
    ratio = torch.where(ns > 0, nt / torch.where(ns > 0, ns, torch.ones_like(ns)), torch.ones_like(ns))
    return (dora_scale.float() * ratio.reshape(dora_scale.shape)).to(dora_scale.dtype)
