"""LoHa (ComfyUI's ``LoHaAdapter``): ``ΔW = alpha/r · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)``, r = rows of
``hada_w1_b``. With Tucker cores ``hada_t1``/``hada_t2`` (``[r, r, kh, kw]``; then ``w_a`` is
``[r, out]`` and ``w_b`` is ``[r, in]``) each factor is ``einsum('ijkl,jr,ip->prkl', t, w_b, w_a)``
(conv). No factored form: projected densely and re-factored into a LoRA; ``copy`` writes it back
as it came.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch
from torch import Tensor

from ..adapters import Adapter, register
from ..errors import ProLoRAError
from ._fit import check_fits


def tucker_factor(t: Tensor, b: Tensor, a: Tensor) -> Tensor:
    """``einsum('ijkl,jr,ip->prkl', t, b, a)`` in float32: a LyCORIS Tucker core ``t``
    ``[r, r, kh, kw]`` with ``b`` ``[r, in]`` and ``a`` ``[r, out]`` → ``[out, in, kh, kw]``, as
    ComfyUI's LoHa adapter forms it."""
    return torch.einsum("ijkl,jr,ip->prkl", t.float(), b.float(), a.float())


@register
@dataclass(frozen=True)
class LoHa(Adapter):
    """A LoHa update. ``parts`` holds the stored tensors by suffix (``.hada_w1_a`` …), 2-D each,
    plus the Tucker cores ``.hada_t1``/``.hada_t2`` when the file has them."""

    kind: ClassVar[str] = "loha"
    SUFFIXES: ClassVar[tuple[str, ...]] = (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b")
    TUCKER: ClassVar[tuple[str, ...]] = (".hada_t1", ".hada_t2")
    SPELLINGS: ClassVar[tuple[tuple[str, tuple[str, ...]], ...]] = (("LoHa", SUFFIXES + TUCKER),)
    READS: ClassVar[tuple[str, ...]] = SUFFIXES + TUCKER
    WRITES: ClassVar[tuple[str, ...]] = SUFFIXES + TUCKER
    parts: dict[str, Tensor]
    alpha: float | None
    key: str

    @classmethod
    def parse(cls, name: str, label: str, parts: Mapping[str, str], state: Mapping[str, Tensor], alpha: float | None,
              where: str) -> LoHa:
        tucker = any(s in parts for s in cls.TUCKER)
        wanted = cls.SUFFIXES + (cls.TUCKER if tucker else ())
        missing = [s.removeprefix(".") for s in wanted if s not in parts]
        first = next(parts[s] for s in wanted if s in parts)
        if missing:
            raise ProLoRAError(f"LoHa module lacks {', '.join(missing)}", file=where, key=first)
        t = {s: state[parts[s]] for s in wanted}
        w1a, w1b, w2a, w2b = (t[s] for s in cls.SUFFIXES)
        two_d = all(t[s].ndim == 2 for s in cls.SUFFIXES) and w1b.shape[0] > 0
        if tucker:  # w_a [r, out], w_b [r, in], t [r, r, kh, kw]
            t1, t2 = t[".hada_t1"], t[".hada_t2"]
            ok = two_d and t1.ndim == t2.ndim == 4 and all(
                c.shape[0] == a.shape[0] and c.shape[1] == b.shape[0] for c, a, b in ((t1, w1a, w1b), (t2, w2a, w2b)))
            ok = ok and w1a.shape[1] == w2a.shape[1] and w1b.shape[1] == w2b.shape[1] and t1.shape[2:] == t2.shape[2:]
        else:
            ok = two_d and w1a.shape[1] == w1b.shape[0] and w2a.shape[1] == w2b.shape[0]
            ok = ok and w1a.shape[0] == w2a.shape[0] and w1b.shape[1] == w2b.shape[1]
        check_fits(ok, "LoHa", t, where, first)
        return cls(t, alpha, first)

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

    def tensors(self) -> list[Tensor]:
        return list(self.parts.values())

    def copied(self) -> dict[str, Tensor]:
        return dict(self.parts)
