"""LoRA / LoCon: ``ΔW = (alpha / r) · up @ down``, r = rows of ``down`` (ComfyUI's ``LoRAAdapter``).

Spellings, ``<m>`` + (up suffix, down suffix), in ComfyUI's order of preference: kohya-dotted
``.lora_up.weight`` / ``.lora_down.weight``; diffusers' legacy attention processors
``_lora.up.weight`` / ``_lora.down.weight``; PEFT ``.lora_B.weight`` / ``.lora_A.weight``; diffusers
``.lora.up.weight`` / ``.lora.down.weight``; Mochi ``.lora_B`` / ``.lora_A``; transformers
``.lora_linear_layer.up.weight`` / ``.down.weight``; PEFT with its adapter name
``.lora_B.default.weight`` / ``.lora_A.default.weight``. Factors are 2-D (linear) or 4-D (conv: up
``[out, r, 1, 1]``, down ``[r, in, kh, kw]``); any rank, also above ``min(m, n)``. A LoCon Tucker
core ``.lora_mid.weight`` (``[r, r, kh, kw]``, next to kohya factors only) is folded into ``down``
when read (:func:`fold_tucker`). Projected in factored form (O((m + n)·k·r), no ``m × n`` matrix).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch
from torch import Tensor

from ..adapters import Adapter, Projected, register
from ..errors import ProLoRAError
from ..projection import Factors, Mode, project

#: (up suffix, down suffix) pairs in the order ComfyUI's ``LoRAAdapter.load`` tries them. No suffix
#: is the end of another, so each key has at most one (``x_lora.up.weight`` ≠ ``x.lora.up.weight``).
FACTOR_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_up.weight", ".lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_B", ".lora_A"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    (".lora_B.default.weight", ".lora_A.default.weight"),
)
MID_SUFFIX = ".lora_mid.weight"


def fold_tucker(down: Tensor, mid: Tensor) -> Tensor:
    """``down'[o, i, h, w] = Σ_j down[j, i] · mid[o, j, h, w]``: a LoCon Tucker core folded into
    ``down`` (``[r, in, 1, 1]`` and ``[r, r, kh, kw]`` → ``[r, in, kh, kw]``), as ComfyUI's
    LoRAAdapter computes it (in float32; the result keeps ``down``'s dtype)."""
    folded = torch.einsum("ji,ojhw->oihw", down.reshape(down.shape[0], -1).float(), mid.float())
    return folded.to(down.dtype)


@register
@dataclass(frozen=True)
class LoraModule(Adapter):
    """A LoRA/LoCon update: ``ΔW = (alpha / r) · up @ down`` in the module's own shape.

    ``up`` is ``[m, r]`` or ``[out, r, 1, 1]``; ``down`` is ``[r, n]`` or ``[r, in, kh, kw]``.
    """

    kind: ClassVar[str] = "lora"
    SPELLINGS: ClassVar[tuple[tuple[str, tuple[str, ...]], ...]] = tuple(
        (f"LoRA {up.removeprefix('.')}", (up, down)) for up, down in FACTOR_SUFFIXES)
    READS: ClassVar[tuple[str, ...]] = (*(s for pair in FACTOR_SUFFIXES for s in pair), MID_SUFFIX)
    WRITES: ClassVar[tuple[str, ...]] = FACTOR_SUFFIXES[0]
    name: str
    up: Tensor
    down: Tensor
    alpha: float | None
    up_key: str
    down_key: str

    @classmethod
    def set_aside(cls, parts: dict[str, str], where: str) -> dict[str, str]:
        """A Tucker core without kohya factors is refused: ComfyUI reads it only next to those."""
        if MID_SUFFIX in parts and FACTOR_SUFFIXES[0][0] not in parts:
            raise ProLoRAError("a Tucker core (lora_mid) needs lora_up/lora_down factors (ComfyUI reads it only next to those and "
                               "would apply this module without it)", file=where, key=parts[MID_SUFFIX])
        return {}

    @classmethod
    def parse(cls, name: str, label: str, parts: Mapping[str, str], state: Mapping[str, Tensor], alpha: float | None,
              where: str) -> LoraModule:
        up_s, down_s = dict(cls.SPELLINGS)[label]
        if down_s not in parts:
            raise ProLoRAError("has an up factor but no down factor", file=where, key=parts[up_s])
        if up_s not in parts:
            raise ProLoRAError("has a down factor but no up factor", file=where, key=parts[down_s])
        up_key, down_key = parts[up_s], parts[down_s]
        up, down = state[up_key], state[down_key]
        for t, key in ((up, up_key), (down, down_key)):
            if t.ndim not in (2, 4):
                raise ProLoRAError(f"has shape {list(t.shape)}; a LoRA factor must be 2-D (linear) or 4-D (conv)", file=where, key=key)
        if up.ndim != down.ndim:
            raise ProLoRAError(f"up is {up.ndim}-D {list(up.shape)} but down is {down.ndim}-D {list(down.shape)}", file=where, key=up_key)
        if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
            raise ProLoRAError(f"conv up factor must be [out, r, 1, 1], got {list(up.shape)}", file=where, key=up_key)
        if up.shape[1] != down.shape[0]:
            raise ProLoRAError(f"up and down ranks disagree: up {list(up.shape)} has rank {up.shape[1]}, down {list(down.shape)} "
                               f"has rank {down.shape[0]}", file=where, key=up_key)
        if down.shape[0] == 0:
            raise ProLoRAError("has rank 0", file=where, key=down_key)
        if MID_SUFFIX in parts:
            mid, r = state[parts[MID_SUFFIX]], int(down.shape[0])
            if down.ndim != 4 or tuple(down.shape[2:]) != (1, 1) or mid.ndim != 4 or tuple(mid.shape[:2]) != (r, r):
                raise ProLoRAError(f"a Tucker core must be [r, r, kh, kw] on a [r, in, 1, 1] down factor; got mid {list(mid.shape)}, "
                                   f"down {list(down.shape)}", file=where, key=parts[MID_SUFFIX])
            down = fold_tucker(down, mid)
        return cls(name, up, down, alpha, up_key, down_key)

    @property
    def key(self) -> str:  # type: ignore[override]
        return self.up_key

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

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

    @property
    def default_rank(self) -> int | None:
        """The input's own rank."""
        return self.rank

    def factors(self, dtype: torch.dtype = torch.float32) -> Factors:
        """The 2-D factors in ``dtype`` (float32 or better for the math)."""
        return Factors(self.up.reshape(self.up.shape[0], -1).to(dtype), self.down.reshape(self.rank, -1).to(dtype), self.scale)

    def dense(self) -> Tensor:
        return self.factors().dense()

    def tensors(self) -> list[Tensor]:
        return [self.up, self.down]

    def norm(self) -> float:
        return self.factors().frobenius_norm()

    def row_blocks(self) -> list[tuple[int, int, Adapter]] | None:
        """A block-diagonal ``up`` (kohya ``split_qkv``): its blocks (:mod:`.block_diagonal`)."""
        from .block_diagonal import LoraBlock  # the block type builds on this one

        blocks = LoraBlock.split(self)
        return None if blocks is None else [(b.row_start, int(b.up.shape[0]), b) for b in blocks]

    def output_layout(self, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Factors are written in the input's own layout (2-D or 4-D, as it came)."""
        return self.layout

    def project(self, source, target, mode: Mode, out_rank: int | None) -> Projected:  # type: ignore[no-untyped-def]
        """Factored projection (:func:`.projection.project`); ``copy`` gives the factors back."""
        f = self.factors() if mode == "copy" else project(self.factors(), source, target, mode)
        f = Factors(f.up.to("cpu", torch.float32), f.down.to("cpu", torch.float32), f.scale)
        return Projected(f.frobenius_norm(), f, self.layout)
