"""The adapter interface: what one module's update is, how it is read from a LoRA file, its dense
``ΔW`` or factors, how it is projected, and how the projection is written back. One format per
file in :mod:`.adapter_types` (LoRA/LoCon, LoHa, LoKr, full diff), each a subclass of
:class:`Adapter` registered with :func:`register`; :data:`ADAPTERS` lists them in the order
ComfyUI 0.3.75's ``comfy.weight_adapter.adapters`` tries them (``load_lora``). Semantics exactly as
ComfyUI's adapters; each file's docstring gives its ``ΔW``.

The projection does not commute with ``⊙`` or ``⊗``: updates without a factored form (LoHa, LoKr,
diff) are projected as their dense ``ΔW`` (float32, :func:`.projection.project_dense`); LoRA
factors in factored form (:func:`.projection.project`). A projected dense update is re-factored
into a LoRA (:func:`refactor`) unless its format stays dense (a diff stays a diff). DoRA's
magnitude follows the ratio rule (:func:`dora_magnitude`); 1-D parts are carried (:class:`Module`).

Adding a format: a file in ``adapter_types/`` with an :class:`Adapter` subclass decorated with
:func:`register` (``SPELLINGS`` it reads, ``parse``, ``rank``, ``matrix_shape``, ``dense``,
``tensors``; override ``project``/``from_dense``/``copied`` when it has a factored form or writes
back in a form of its own), and its import in ``adapter_types/__init__.py`` at ComfyUI's place.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Mapping, TypeVar

import torch
from torch import Tensor

from .linalg import linalg_device, matrix_shape as weight_matrix_shape
from .projection import Factors, Mode, project_dense

if TYPE_CHECKING:
    from .basis import Basis

#: The energy (Σσ²) a re-factored LoHa/LoKr keeps when no output rank is given, and the rank cap.
ENERGY_KEPT = 0.999
MAX_REFACTOR_RANK = 64
#: Why a key is not used, when its name ends in no suffix ComfyUI's loader reads.
NOT_READ = "not a part ComfyUI's LoRA loader reads (ComfyUI would log 'lora key not loaded' and skip it)"


@dataclass(frozen=True)
class Projected:
    """A module's update after projection, ready to write: LoRA ``factors`` written in ``layout``
    (the update's own shape or the base weight's; conv 4-D), or a dense ``diff`` (the weight's
    shape, float32, CPU). ``norm``: ``‖ΔW‖_F`` of what is written. ``energy``: ``(kept, total)``
    Σσ² when a dense update was re-factored (``energy_kept`` = kept share, in [0, 1])."""

    norm: float
    factors: Factors | None = None
    layout: tuple[int, ...] = ()
    diff: Tensor | None = None
    energy: tuple[float, float] | None = None
    energy_kept: float | None = None


class Adapter(ABC):
    """One module's matrix update in one adapter format.

    Every format has ``kind`` (its name in reports), ``key`` (one of its keys, for messages),
    ``alpha``, ``rank``, ``matrix_shape`` (``(m, n)``, conv as ``out × in·kh·kw``) and ``dense()``
    (float32 ``m × n``, scale included). Reading: ``SPELLINGS`` (label, suffixes) in ComfyUI's order,
    :meth:`claims`, :meth:`set_aside`, :meth:`parse`. Projection: :meth:`project` (default: the dense
    path) and :meth:`from_dense`; writing: :meth:`copied` (copy mode) and the layout of factors.
    """

    kind: ClassVar[str]
    #: (label, suffixes) per spelling of the format, in ComfyUI's order; the label names it in messages.
    SPELLINGS: ClassVar[tuple[tuple[str, tuple[str, ...]], ...]]
    #: Every suffix the format reads (spellings and cores), and the suffixes it writes.
    READS: ClassVar[tuple[str, ...]]
    WRITES: ClassVar[tuple[str, ...]]
    key: str
    alpha: float | None

    # -- reading --------------------------------------------------------------------------------
    @classmethod
    def claims(cls, parts: Mapping[str, str], state: Mapping[str, Tensor]) -> dict[str, str]:
        """The spellings of this format among a module's ``parts`` (suffix → key): label → first key."""
        return {label: next(parts[s] for s in suffixes if s in parts)
                for label, suffixes in cls.SPELLINGS if any(s in parts for s in suffixes)}

    @classmethod
    def set_aside(cls, parts: dict[str, str], where: str) -> dict[str, str]:
        """Before a module is built: remove from ``parts`` the keys ComfyUI does not use (key →
        reason; all of them when ComfyUI applies nothing of the module), or refuse parts that cannot
        stand (:class:`~.errors.ProLoRAError`). Default: nothing."""
        return {}

    @classmethod
    @abstractmethod
    def parse(cls, name: str, label: str, parts: Mapping[str, str], state: Mapping[str, Tensor], alpha: float | None,
              where: str) -> Adapter:
        """The update of module ``name`` in spelling ``label``, validated (shapes fit; else
        :class:`~.errors.ProLoRAError` naming ``where`` and the key)."""

    # -- what it is -----------------------------------------------------------------------------
    @property
    @abstractmethod
    def rank(self) -> int: ...

    @property
    @abstractmethod
    def matrix_shape(self) -> tuple[int, int]: ...

    @abstractmethod
    def dense(self) -> Tensor:
        """``ΔW`` as a float32 ``m × n`` matrix, scale included."""

    @abstractmethod
    def tensors(self) -> list[Tensor]:
        """The stored tensors (for the file's dtype)."""

    @property
    def is_conv(self) -> bool:
        """The update's own shape is 4-D (a conv update)."""
        return any(t.ndim == 4 for t in self.tensors())

    @property
    def default_rank(self) -> int | None:
        """The output rank when none is asked for: ``None`` = :func:`refactor`'s energy rule."""
        return None

    def norm(self) -> float:
        """``‖ΔW‖_F`` (float64)."""
        return float(self.dense().double().norm())

    def fits(self, weight_shape: tuple[int, ...]) -> bool:
        """ComfyUI applies the update to a weight of this shape: ``m × n`` equals ``out × in·kh·kw``
        (factors are flattened and the product reshaped to the weight)."""
        return self.matrix_shape == weight_matrix_shape(weight_shape)

    def row_blocks(self) -> list[tuple[int, int, Adapter]] | None:
        """``(row_start, rows, block)`` when the update is block-diagonal over row blocks of its
        weight and each block is projected on its own rows (:mod:`.adapter_types.block_diagonal`);
        ``None`` (default): projected whole."""
        return None

    # -- projection and writing -----------------------------------------------------------------
    def output_layout(self, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape output factors are written in (default: the base weight's)."""
        return tuple(weight_shape)

    def project(self, source: Basis | None, target: Basis | None, mode: Mode, out_rank: int | None) -> Projected:
        """Eq. 3 and its variants on ``ΔW`` (dense path, :func:`.projection.project_dense`), written
        back by :meth:`from_dense`. Bases are ``None`` only in ``copy`` mode."""
        delta = project_dense(self.dense(), source, target, mode)  # type: ignore[arg-type]
        norm = float(delta.double().norm())
        return self.from_dense(delta, tuple(target.shape), out_rank, norm**2)  # type: ignore[union-attr]

    def from_dense(self, delta: Tensor, weight_shape: tuple[int, ...], rank: int | None, total: float,
                   refactored: Refactored | None = None) -> Projected:
        """A dense projected ``m × n`` update (``total`` = its Σσ²) in this format's output: LoRA
        factors of rank ``rank`` (:func:`refactor`, or ``refactored`` when already done)."""
        rf = refactored if refactored is not None else refactor(delta, rank)
        return Projected(rf.factors.frobenius_norm(), rf.factors, self.output_layout(weight_shape), None,
                         (rf.energy_kept * total, total), rf.energy_kept)

    def copied(self) -> dict[str, Tensor] | None:
        """``copy`` mode: the tensors written back exactly as they came, by suffix (alpha and DoRA
        are added by the caller); ``None`` when the update is written as its factors instead."""
        return None


A = TypeVar("A", bound=type[Adapter])
#: The registered formats, in the order ComfyUI tries them.
ADAPTERS: list[type[Adapter]] = []


def register(cls: A) -> A:
    """Class decorator: add a format to :data:`ADAPTERS` (import order = ComfyUI's order)."""
    ADAPTERS.append(cls)
    return cls


#: A module's matrix update, whatever the format.
Update = Adapter


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
        return 0.0 if self.update is None else self.update.norm()


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
