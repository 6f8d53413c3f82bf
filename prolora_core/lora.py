"""LoRA files in and out: parsing the key formats into factored modules, and writing them back.

In: kohya-dotted (``<m>.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha``, also ComfyUI-native
``diffusion_model.<m>…`` and kohya-underscore names ``lora_unet_a_b``), PEFT (``lora_B`` /
``lora_A``), old diffusers (``.lora.up`` / ``.lora.down``, ``lora_linear_layer.up`` / ``.down``),
LoCon conv (down ``[r, in, kh, kw]``, up ``[out, r, 1, 1]``). The scale is ``alpha / r``, 1 without
alpha. Out: kohya-dotted with ``.alpha`` written so that ``alpha / rank`` reproduces the scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .errors import ProLoRAError
from .linalg import all_finite
from .projection import Factors
from .safetensors_io import SafetensorsReader

#: (up suffix, down suffix) pairs, longest first so that ``.lora.up.weight`` wins over shorter ones.
FACTOR_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    (".lora_up.weight", ".lora_down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
)
ALPHA_SUFFIX = ".alpha"

#: Adapter parts recognised but not handled yet: (substring of the key, what it is).
UNSUPPORTED_PARTS: tuple[tuple[str, str], ...] = (
    (".lora_mid.", "LoCon Tucker core (lora_mid)"),
    (".dora_scale", "DoRA magnitude (dora_scale)"),
    (".hada_", "LoHa (hada_*)"),
    (".lokr_", "LoKr (lokr_*)"),
    (".oft_", "OFT (oft_*)"),
    (".oft_blocks", "OFT (oft_blocks)"),
    (".boft_", "BOFT"),
    (".a1.weight", "GLoRA"),
    (".diff_b", "full bias difference (.diff_b)"),
    (".diff", "full weight difference (.diff)"),
    (".w_norm", "norm weight (w_norm)"),
    (".b_norm", "norm bias (b_norm)"),
    (".set_weight", "weight replacement (set_weight)"),
)


def unsupported_part(key: str) -> str | None:
    """What unsupported adapter part ``key`` is, or ``None``.

    A part matches whole name components only: ``.diff`` matches ``m.diff`` but not
    ``model.diffusion_model.m…``; parts ending in ``.`` or ``_`` (``.lora_mid.``, ``.hada_``) are prefixes
    of a component.
    """
    for part, what in UNSUPPORTED_PARTS:
        if part.endswith((".", "_")):
            if part in key:
                return what
        elif key.endswith(part) or part + "." in key:
            return what
    return None


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: ``ΔW = (alpha / r) · up @ down`` in the module's own shape.

    ``up`` is ``[m, r]`` or ``[out, r, 1, 1]``; ``down`` is ``[r, n]`` or ``[r, in, kh, kw]``.
    """

    name: str
    up: Tensor
    down: Tensor
    alpha: float | None
    up_key: str
    down_key: str

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
    def matrix_shape(self) -> tuple[int, int]:
        """``(m, n)`` of the update as a matrix."""
        n = 1
        for d in self.down.shape[1:]:
            n *= int(d)
        return int(self.up.shape[0]), n

    def factors(self, dtype: torch.dtype = torch.float32) -> Factors:
        """The 2-D factors in ``dtype`` (float32 or better for the math)."""
        return Factors(self.up.reshape(self.up.shape[0], -1).to(dtype), self.down.reshape(self.rank, -1).to(dtype), self.scale)


@dataclass
class LoraFile:
    """A parsed LoRA: its modules, the keys we do not know, its metadata and its dtype."""

    path: Path | None
    modules: dict[str, LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)
    unknown_keys: list[str] = field(default_factory=list)
    dtype: torch.dtype = torch.float32


def _label(path: Path | None) -> str:
    return str(path) if path is not None else "<LoRA>"


def parse_state_dict(state: dict[str, Tensor], path: Path | None = None, metadata: dict[str, str] | None = None) -> LoraFile:
    """Group ``state`` into :class:`LoraModule` s, validating each (shapes, ranks, dtype, finiteness)."""
    where = _label(path)
    if not state:
        raise ProLoRAError("the file holds no tensors", file=where)
    for key in state:
        what = unsupported_part(key)
        if what is not None:
            raise ProLoRAError(f"{what} is not supported yet; only plain LoRA/LoCon factors are", file=where, key=key)
    ups: dict[str, str] = {}
    downs: dict[str, str] = {}
    alphas: dict[str, str] = {}
    unknown: list[str] = []
    for key in state:
        for up_s, down_s in FACTOR_SUFFIXES:
            if key.endswith(up_s):
                ups[key[: -len(up_s)]] = key
                break
            if key.endswith(down_s):
                downs[key[: -len(down_s)]] = key
                break
        else:
            if key.endswith(ALPHA_SUFFIX):
                alphas[key[: -len(ALPHA_SUFFIX)]] = key
            else:
                unknown.append(key)
    modules: dict[str, LoraModule] = {}
    for name in sorted(set(ups) | set(downs)):
        if name not in downs:
            raise ProLoRAError("has an up factor but no down factor", file=where, key=ups[name])
        if name not in ups:
            raise ProLoRAError("has a down factor but no up factor", file=where, key=downs[name])
        modules[name] = _module(name, state, ups[name], downs[name], alphas.get(name), where)
    unknown += [k for n, k in alphas.items() if n not in modules]
    if not modules:
        shown = ", ".join(sorted(unknown)[:3])
        raise ProLoRAError(f"no LoRA module found (no lora_up/lora_down or lora_B/lora_A pairs); keys look like: {shown}", file=where)
    dtypes = {m.up.dtype for m in modules.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    return LoraFile(path, modules, dict(metadata or {}), sorted(unknown), dtype)


def _check_tensor(t: Tensor, where: str, key: str) -> None:
    if not torch.is_floating_point(t):
        raise ProLoRAError(f"has integer dtype {str(t.dtype).removeprefix('torch.')}; LoRA factors must be floating point", file=where, key=key)
    if not all_finite(t):
        bad = "NaN" if bool(torch.isnan(t.float()).any()) else "Inf"
        raise ProLoRAError(f"contains {bad} values", file=where, key=key)


def _module(name: str, state: dict[str, Tensor], up_key: str, down_key: str, alpha_key: str | None, where: str) -> LoraModule:
    up, down = state[up_key], state[down_key]
    for t, key in ((up, up_key), (down, down_key)):
        if t.ndim not in (2, 4):
            raise ProLoRAError(f"has shape {list(t.shape)}; a LoRA factor must be 2-D (linear) or 4-D (conv)", file=where, key=key)
        _check_tensor(t, where, key)
    if up.ndim != down.ndim:
        raise ProLoRAError(f"up is {up.ndim}-D {list(up.shape)} but down is {down.ndim}-D {list(down.shape)}", file=where, key=up_key)
    if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
        raise ProLoRAError(f"conv up factor must be [out, r, 1, 1], got {list(up.shape)}", file=where, key=up_key)
    if up.shape[1] != down.shape[0]:
        raise ProLoRAError(f"up and down ranks disagree: up {list(up.shape)} has rank {up.shape[1]}, down {list(down.shape)} has rank {down.shape[0]}", file=where, key=up_key)
    if down.shape[0] == 0:
        raise ProLoRAError("has rank 0", file=where, key=down_key)
    alpha: float | None = None
    if alpha_key is not None:
        a = state[alpha_key]
        if a.numel() != 1 or not (torch.is_floating_point(a) or a.dtype in (torch.int32, torch.int64, torch.int16)):
            raise ProLoRAError(f"alpha must be a scalar, got shape {list(a.shape)} dtype {a.dtype}", file=where, key=alpha_key)
        alpha = float(a.reshape(()))
        if not math.isfinite(alpha) or alpha <= 0:
            raise ProLoRAError(f"alpha must be a finite positive number, got {alpha}", file=where, key=alpha_key)
    return LoraModule(name, up, down, alpha, up_key, down_key)


def read_lora(path: str | Path) -> LoraFile:
    """Read and validate a LoRA safetensors file."""
    reader = SafetensorsReader(path)
    state = {k: reader.get(k) for k in reader.keys()}
    return parse_state_dict(state, reader.path, reader.header.metadata)


def module_tensors(name: str, factors: Factors, like: LoraModule, dtype: torch.dtype) -> dict[str, Tensor]:
    """Kohya-dotted tensors for one output module, shaped like the input module (conv stays 4-D).

    ``alpha = scale · rank_out`` so that ComfyUI's ``alpha / rank`` gives back exactly ``scale``.
    """
    r = factors.rank
    up, down = factors.up, factors.down
    if like.is_conv:
        up = up.reshape(up.shape[0], r, 1, 1)
        down = down.reshape(r, *like.down.shape[1:])
    return {
        f"{name}.lora_up.weight": up.to("cpu", dtype).contiguous(),
        f"{name}.lora_down.weight": down.to("cpu", dtype).contiguous(),
        f"{name}.alpha": torch.tensor(factors.scale * r, dtype=torch.float32),
    }
