"""Weight slices: a place a LoRA module can sit on that is part of a fused weight.

Fused families keep several projections in one weight: Flux's ``img_attn.qkv`` ``[3h, h]`` holds q,
k and v as row blocks, a single block's ``linear1`` ``[3h + 4h, h]`` holds q, k, v and ``proj_mlp``.
LoRAs trained on the unfused layout (diffusers/PEFT ``…attn.to_q``) touch one block of rows. ComfyUI's
key maps (``comfy.lora.model_lora_keys_unet``) express such a place as ``(weight_key, (dim, start,
length))`` and ``comfy.lora.calculate_weight`` applies the patch to ``weight.narrow(dim, start,
length)``. (A key map target may also carry a function applied to the update; the one ComfyUI uses,
``swap_scale_shift`` for diffusers' ``norm_out.linear``, is served as :class:`SwappedHalves`.)

Here a slice is a weight of its own under a *virtual key* ``<weight_key>[dim:start:length]``, served
by :class:`SlicedWeights` (a :class:`~.weights.WeightSource` wrapper) as the narrowed weight: shape
``weight.shape`` with ``shape[dim]`` replaced by ``length``. Bases, Φ, projection and assembly run on
it unchanged, so a ``to_q`` update ``[h, h]`` is projected with the top-k singular subspaces of the
q rows ``W[0:h]`` of the fused weight (the map ComfyUI applies it to), not of the whole ``[3h, h]``
weight. Name pairing takes the same slice of the target's weight of the same name. A slice's content
key hashes the slice's own values, so the basis cache keys it like any weight.

Why slice bases and not whole-weight bases (measured on a tiny Flux pair, tests/test_family_flux.py,
README "Flux.1 and Chroma"): a projection with the whole weight's bases moves part of the update
into the k and v rows, which a ``to_q`` LoRA cannot carry (ComfyUI writes it only into the q rows);
with the slice's bases the update stays on its rows and is written back under the LoRA's own keys.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .errors import ProLoRAError
from .weights import WeightSource, content_key_of_tensor

_VIRTUAL = re.compile(r"^(?P<key>.+)\[(?P<dim>\d+):(?P<start>\d+):(?P<length>\d+)\]$")


@dataclass(frozen=True)
class WeightSlice:
    """``weight.narrow(dim, start, length)`` of the weight ``key`` (ComfyUI's offset triple)."""

    key: str
    dim: int
    start: int
    length: int

    @property
    def virtual_key(self) -> str:
        """``<key>[dim:start:length]``: the slice's key in a :class:`SlicedWeights`."""
        return f"{self.key}[{self.dim}:{self.start}:{self.length}]"

    @classmethod
    def parse(cls, key: str) -> WeightSlice | None:
        """The slice a virtual key names, or ``None`` for a plain weight key."""
        m = _VIRTUAL.match(key)
        if m is None:
            return None
        return cls(m["key"], int(m["dim"]), int(m["start"]), int(m["length"]))

    def on(self, key: str) -> WeightSlice:
        """The same span of another weight (the target's weight of the same name)."""
        return WeightSlice(key, self.dim, self.start, self.length)

    def fits(self, shape: tuple[int, ...]) -> bool:
        return self.dim < len(shape) and self.length > 0 and self.start + self.length <= shape[self.dim]

    def shape(self, whole: tuple[int, ...]) -> tuple[int, ...]:
        """The slice's shape within a weight of shape ``whole``; :class:`ProLoRAError` when it does not fit."""
        if not self.fits(whole):
            raise ProLoRAError(f"slice {self.dim}:{self.start}:{self.length} does not fit the weight {list(whole)}", key=self.key)
        return tuple(self.length if i == self.dim else int(d) for i, d in enumerate(whole))

    def take(self, weight: Tensor) -> Tensor:
        """The slice of ``weight`` (a view)."""
        self.shape(tuple(weight.shape))
        return weight.narrow(self.dim, self.start, self.length)


@dataclass(frozen=True)
class SwappedHalves:
    """The weight ``key`` with its two row halves swapped.

    ComfyUI maps diffusers' ``norm_out.linear`` (rows ordered scale, shift) onto Flux's/SD3's
    ``final_layer.adaLN_modulation.1`` (rows shift, scale) with ``comfy.utils.swap_scale_shift``,
    applied to the update before it is added. The swap is its own inverse, so the LoRA's update lives
    on ``swap(W)`` ``[2h, n]``: projected with the bases of ``swap(W)`` and written back under the
    LoRA's own name, ComfyUI's swap puts it in place.
    """

    key: str

    @property
    def virtual_key(self) -> str:
        return f"{self.key}[swap]"

    @classmethod
    def parse(cls, key: str) -> SwappedHalves | None:
        return cls(key[: -len("[swap]")]) if key.endswith("[swap]") else None

    def on(self, key: str) -> SwappedHalves:
        return SwappedHalves(key)

    def fits(self, shape: tuple[int, ...]) -> bool:
        return len(shape) >= 1 and shape[0] % 2 == 0

    def shape(self, whole: tuple[int, ...]) -> tuple[int, ...]:
        if not self.fits(whole):
            raise ProLoRAError(f"the rows of the weight {list(whole)} do not split into two halves", key=self.key)
        return tuple(int(d) for d in whole)

    def take(self, weight: Tensor) -> Tensor:
        self.shape(tuple(weight.shape))
        first, second = weight.chunk(2, dim=0)
        return torch.cat([second, first], dim=0)


#: A part of a weight a module can sit on.
Place = WeightSlice | SwappedHalves


def parse_place(key: str) -> Place | None:
    """The slice or swapped weight a virtual key names, or ``None`` for a plain weight key."""
    return WeightSlice.parse(key) or SwappedHalves.parse(key)


def place_key(target: Any, swap_halves: Callable[..., Any] | None = None) -> str | None:
    """A target of ComfyUI's LoRA key maps as a weight key of a :class:`SlicedWeights`.

    ``"w.weight"`` → itself; ``("w.weight", (dim, start, length))`` → the slice's virtual key;
    ``("w.weight", None)`` → ``"w.weight"``; ``("w.weight", None, fn)`` with ``fn`` the function
    given as ``swap_halves`` (ComfyUI's ``swap_scale_shift``) → ``"w.weight[swap]"``. Any other
    function changes the update in a way the engine does not model: ``None`` (reported unmapped).
    """
    if isinstance(target, str):
        return target
    if not isinstance(target, tuple) or len(target) not in (2, 3) or not isinstance(target[0], str):
        return None
    key, offset = target[0], target[1]
    if len(target) == 3 and target[2] is not None:
        return SwappedHalves(key).virtual_key if swap_halves is not None and target[2] is swap_halves and offset is None else None
    if offset is None:
        return key
    dim, start, length = (int(v) for v in offset)
    return WeightSlice(key, dim, start, length).virtual_key


class SlicedWeights:
    """A :class:`~.weights.WeightSource` that also serves slices (and swapped-halves views) of its
    weights by virtual key.

    ``keys()`` lists the inner source's weights only (slices are not enumerated); ``shape``, ``get``
    and ``content_key`` accept virtual keys. Other attributes (``path``, ``save_memo`` …) are the
    inner source's.
    """

    def __init__(self, inner: WeightSource) -> None:
        self.inner = inner
        self.label = inner.label
        self._keys: set[str] | None = None

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def keys(self) -> list[str]:
        return self.inner.keys()

    def has(self, key: str) -> bool:
        """Whether ``key`` names a weight, or a slice that fits its weight."""
        if self._keys is None:
            self._keys = set(self.inner.keys())
        s = parse_place(key)
        if s is None:
            return key in self._keys
        return s.key in self._keys and s.fits(tuple(self.inner.shape(s.key)))

    def shape(self, key: str) -> tuple[int, ...]:
        s = parse_place(key)
        return tuple(self.inner.shape(key)) if s is None else s.shape(tuple(self.inner.shape(s.key)))

    def get(self, key: str) -> Tensor:
        s = parse_place(key)
        return self.inner.get(key) if s is None else s.take(self.inner.get(s.key))

    def content_key(self, key: str) -> str:
        """A plain weight's content key from the inner source; a slice's from its own values."""
        s = parse_place(key)
        return self.inner.content_key(key) if s is None else content_key_of_tensor(self.get(key))


def with_slices(source: WeightSource) -> SlicedWeights:
    """``source`` able to serve slices (itself when it already is)."""
    return source if isinstance(source, SlicedWeights) else SlicedWeights(source)
