"""A full weight difference (``.diff``, 2-D or 4-D), added as is: ``ΔW = diff`` (ComfyUI's
``("diff", …)`` patch). Projected densely and written back as a ``.diff`` of the weight's shape
(never re-factored); a 1-D ``.diff`` is a carried part of :class:`..adapters.Module`, not this."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch
from torch import Tensor

from ..adapters import Adapter, Projected, Refactored, register
from ..projection import Mode, project_dense

DIFF_SUFFIX = ".diff"


@register
@dataclass(frozen=True)
class FullDiff(Adapter):
    """A full weight difference ``.diff`` (2-D or 4-D), added as is."""

    kind: ClassVar[str] = "diff"
    SPELLINGS: ClassVar[tuple[tuple[str, tuple[str, ...]], ...]] = (("diff", (DIFF_SUFFIX,)),)
    READS: ClassVar[tuple[str, ...]] = (DIFF_SUFFIX,)
    WRITES: ClassVar[tuple[str, ...]] = (DIFF_SUFFIX,)
    diff: Tensor
    key: str
    alpha: float | None = None

    @classmethod
    def claims(cls, parts: Mapping[str, str], state: Mapping[str, Tensor]) -> dict[str, str]:
        """A 2-D/4-D ``.diff`` only."""
        return {"diff": parts[DIFF_SUFFIX]} if DIFF_SUFFIX in parts and state[parts[DIFF_SUFFIX]].ndim >= 2 else {}

    @classmethod
    def parse(cls, name: str, label: str, parts: Mapping[str, str], state: Mapping[str, Tensor], alpha: float | None,
              where: str) -> FullDiff:
        return cls(state[parts[DIFF_SUFFIX]], parts[DIFF_SUFFIX])

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

    def tensors(self) -> list[Tensor]:
        return [self.diff]

    def fits(self, weight_shape: tuple[int, ...]) -> bool:
        """The weight's own shape (ComfyUI adds it as is)."""
        return super().fits(weight_shape) and tuple(self.diff.shape) == tuple(weight_shape)

    def project(self, source, target, mode: Mode, out_rank: int | None) -> Projected:  # type: ignore[no-untyped-def]
        delta = project_dense(self.dense(), source, target, mode)
        return Projected(float(delta.double().norm()), diff=delta.to("cpu", torch.float32).reshape(target.shape))

    def from_dense(self, delta: Tensor, weight_shape: tuple[int, ...], rank: int | None, total: float,
                   refactored: Refactored | None = None) -> Projected:
        """Stays a dense ``.diff`` of the weight's shape."""
        return Projected(total ** 0.5, diff=delta.to("cpu", torch.float32).reshape(weight_shape))

    def copied(self) -> dict[str, Tensor]:
        return {DIFF_SUFFIX: self.diff}
