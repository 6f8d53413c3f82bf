"""LoKr (ComfyUI's ``LoKrAdapter``): ``ΔW = s · w1 ⊗ w2``, each side stored whole (``.lokr_w1``)
or as ``a @ b`` (``.lokr_w1_a``/``_b``); ``s = alpha / dim`` with dim the rows of ``lokr_w2_b``
(else of ``lokr_w1_b``), and 1 when both sides are whole or there is no alpha. A 4-D ``w2`` makes
a conv update. A Tucker core ``lokr_t2`` is not an update ComfyUI 0.3.75 applies
(:meth:`LoKr.set_aside`). No factored form: projected densely and re-factored into a LoRA;
``copy`` writes it back as it came.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch
from torch import Tensor

from ..adapters import NOT_READ, Adapter, register
from ..errors import ProLoRAError
from ._fit import check_fits

LOKR_SUFFIXES = (".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b")
LOKR_TUCKER = ".lokr_t2"
#: LoKr with a Tucker core: ComfyUI 0.3.75 forms ``w2`` by an einsum whose result is not contiguous,
#: ``torch.kron`` then raises, and ComfyUI logs "ERROR lokr …" and leaves the weight unchanged.
LOKR_TUCKER_FAILS = ("LoKr with a Tucker core (lokr_t2): ComfyUI 0.3.75 fails on it (torch.kron of the non-contiguous "
                     "Tucker product; it logs 'ERROR lokr' and leaves the weight unchanged), so nothing of this module is applied")
LOKR_TUCKER_IGNORED = "a LoKr Tucker core next to a whole lokr_w2: ComfyUI uses lokr_w2 and ignores the core"


@register
@dataclass(frozen=True)
class LoKr(Adapter):
    """A LoKr update. ``parts`` holds ``.lokr_w1`` or ``.lokr_w1_a``/``_b``, and ``.lokr_w2`` or
    ``.lokr_w2_a``/``_b``."""

    kind: ClassVar[str] = "lokr"
    SPELLINGS: ClassVar[tuple[tuple[str, tuple[str, ...]], ...]] = (("LoKr", LOKR_SUFFIXES),)
    READS: ClassVar[tuple[str, ...]] = (*LOKR_SUFFIXES, LOKR_TUCKER)
    WRITES: ClassVar[tuple[str, ...]] = LOKR_SUFFIXES
    parts: dict[str, Tensor]
    alpha: float | None
    key: str

    @classmethod
    def set_aside(cls, parts: dict[str, str], where: str) -> dict[str, str]:
        """A Tucker core ``lokr_t2``: with a factored ``w2`` ComfyUI applies nothing of the module
        (every key set aside); next to a whole ``w2`` it is ignored; alone it is not read."""
        if LOKR_TUCKER not in parts:
            return {}
        core = parts.pop(LOKR_TUCKER)
        if ".lokr_w2" not in parts and (".lokr_w2_a" in parts or ".lokr_w2_b" in parts):
            aside = {k: LOKR_TUCKER_FAILS for k in (core, *parts.values())}
            parts.clear()
            return aside
        return {core: LOKR_TUCKER_IGNORED if ".lokr_w2" in parts else NOT_READ}

    @classmethod
    def parse(cls, name: str, label: str, parts: Mapping[str, str], state: Mapping[str, Tensor], alpha: float | None,
              where: str) -> LoKr:
        first = next(parts[s] for s in LOKR_SUFFIXES if s in parts)
        t: dict[str, Tensor] = {}
        for i in (1, 2):
            whole, a, b = f".lokr_w{i}", f".lokr_w{i}_a", f".lokr_w{i}_b"
            if whole in parts:  # ComfyUI uses a whole side when there is one
                t[whole] = state[parts[whole]]
                check_fits(t[whole].ndim == 2 or (i == 2 and t[whole].ndim == 4), "LoKr", {whole: t[whole]}, where, parts[whole])
            elif a in parts and b in parts:
                t[a], t[b] = state[parts[a]], state[parts[b]]
                check_fits(t[a].ndim == t[b].ndim == 2 and t[a].shape[1] == t[b].shape[0] > 0, "LoKr", {a: t[a], b: t[b]}, where, parts[a])
            else:
                raise ProLoRAError(f"LoKr module lacks w{i} (lokr_w{i}, or lokr_w{i}_a and lokr_w{i}_b)", file=where, key=first)
        return cls(t, alpha, first)

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

    def tensors(self) -> list[Tensor]:
        return list(self.parts.values())

    def copied(self) -> dict[str, Tensor]:
        return dict(self.parts)
