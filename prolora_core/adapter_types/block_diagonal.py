"""Block-diagonal LoRA factors on a fused weight, kept block-diagonal.

kohya's ``split_qkv`` Flux LoRAs train q, k and v (single blocks: q, k, v and ``proj_mlp``) as
separate LoRAs and save them as one module on the fused weight: ``down`` ``[B·r, in]`` (the B downs
stacked) and ``up`` ``[rows, B·r]`` block-diagonal (Flux ``img_attn.qkv``: ``[9216, 3r]``,
``linear1``: ``[21504, 4r]``), so ``ΔW = s · up @ down`` holds each block's update on its own rows
(ComfyUI applies the whole product; ``s = alpha / (B·r)``). Such a module is split into
:class:`LoraBlock` s, one per block, each placed on its rows as a weight slice (:mod:`..slices`) and
projected with that slice's bases, like a diffusers ``to_q`` LoRA on the same rows. Each block's
projected factors are written into its own rows of the whole module (zeros elsewhere), so summing
the blocks (:func:`..assemble._assemble` concatenates factors landing on one module) gives a
block-diagonal ``up`` again: the zeros are kept, no ``rows × in`` matrix is formed.

The blocks are read from the zeros of ``up`` alone: consecutive columns whose non-zero rows lie in
increasing, disjoint row ranges (at least two). Block ``b`` covers the rows from its first non-zero
row to the next block's first (the first block from row 0, the last to the end). A column of zeros
(an untrained LoRA) or overlapping ranges: not block-diagonal, the module is projected whole.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import Tensor

from ..adapters import Projected, Refactored
from ..projection import Factors, Mode
from .lora import LoraModule


def row_blocks(up: Tensor) -> list[tuple[int, int, int, int]] | None:
    """``(row_start, rows, col_start, cols)`` per diagonal block of a 2-D ``up`` ``[m, R]``, or
    ``None`` when it is not block-diagonal with at least two blocks."""
    if up.ndim != 2 or up.shape[1] < 2:
        return None
    m, r = int(up.shape[0]), int(up.shape[1])
    if up[0, r - 1] != 0 or up[m - 1, 0] != 0:  # the last block starts below row 0, the first ends above row m − 1
        return None  # (an O(1) test that spares a dense LoRA the scan below)
    nz = up != 0
    if not bool(nz.any(dim=0).all()):
        return None
    idx = torch.arange(m)[:, None]
    lo = torch.where(nz, idx, m).amin(dim=0).tolist()
    hi = torch.where(nz, idx, -1).amax(dim=0).tolist()
    groups: list[list[int]] = []  # [col_start, cols, lo, hi]
    for j in range(r):
        if groups and lo[j] <= groups[-1][3]:
            g = groups[-1]
            g[1], g[2], g[3] = g[1] + 1, min(g[2], lo[j]), max(g[3], hi[j])
        else:
            groups.append([j, 1, lo[j], hi[j]])
    if len(groups) < 2 or any(a[3] >= b[2] for a, b in zip(groups, groups[1:])):
        return None
    starts = [0] + [g[2] for g in groups[1:]] + [m]
    return [(starts[b], starts[b + 1] - starts[b], g[0], g[1]) for b, g in enumerate(groups)]


@dataclass(frozen=True)
class LoraBlock(LoraModule):
    """One diagonal block of a block-diagonal LoRA module: ``up`` ``[rows, r_b]`` (its rows of the
    whole ``up``), ``down`` ``[r_b, in]``, alpha so that ``alpha / r_b`` is the whole module's
    scale. It sits on rows ``row_start … row_start + rows`` of a whole weight with ``rows_total``
    rows; its projection is written back into those rows of the whole module (``whole_layout``)."""

    kind: ClassVar[str] = "lora"
    row_start: int = 0
    rows_total: int = 0
    whole_layout: tuple[int, ...] = ()

    @classmethod
    def split(cls, whole: LoraModule) -> list[LoraBlock] | None:
        """The blocks of a block-diagonal linear LoRA module, or ``None``."""
        blocks = row_blocks(whole.up)
        if blocks is None:
            return None
        return [cls(whole.name, whole.up[r0:r0 + nr, c0:c0 + nc], whole.down[c0:c0 + nc],
                    None if whole.alpha is None else whole.scale * nc, whole.up_key, whole.down_key, r0, int(whole.up.shape[0]), whole.layout)
                for r0, nr, c0, nc in blocks]

    def row_blocks(self) -> None:
        """A block is projected whole."""
        return None

    def output_layout(self, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
        return self.whole_layout

    def _embedded(self, out: Projected) -> Projected:
        """``out`` with its ``up`` written into this block's rows of the whole module (zeros elsewhere)."""
        f = out.factors
        assert f is not None
        up = torch.zeros(self.rows_total, f.rank, dtype=f.up.dtype)
        up[self.row_start:self.row_start + f.up.shape[0]] = f.up
        return replace(out, factors=Factors(up, f.down, f.scale), layout=self.whole_layout)

    def project(self, source, target, mode: Mode, out_rank: int | None) -> Projected:  # type: ignore[no-untyped-def]
        return self._embedded(super().project(source, target, mode, out_rank))

    def from_dense(self, delta: Tensor, weight_shape: tuple[int, ...], rank: int | None, total: float,
                   refactored: Refactored | None = None) -> Projected:
        return self._embedded(super().from_dense(delta, weight_shape, rank, total, refactored))
