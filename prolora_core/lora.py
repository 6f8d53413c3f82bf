"""LoRA files in and out: parsing the key formats into adapted modules, and writing them back.

In, per module, what ComfyUI 0.3.75's ``comfy.lora.load_lora`` reads: the keys are grouped by
module and suffix; each registered format (:data:`.adapters.ADAPTERS`, one file each in
:mod:`.adapter_types`: LoRA/LoCon in all its spellings, LoHa, LoKr, a 2-D/4-D ``.diff``) sets aside
what ComfyUI would not use, claims its spellings, and parses its update. Around the update, this
file reads the parts every format shares:

* ``.alpha`` (scale ``alpha / r``, 1 without alpha; 0-d or 1-element, float or int),
  ``.dora_scale`` (DoRA magnitude).
* 1-D parts carried over unchanged: ``.diff_b``, ``.w_norm``, ``.b_norm``, a 1-D ``.diff``.

Every tensor not used is kept in :attr:`LoraFile.unused` with the reason, for reports.

Out: kohya-dotted ``lora_up``/``lora_down`` with ``.alpha`` written so that ``alpha / rank``
reproduces the scale, plus whatever other parts the module carries, under the same suffixes.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .adapter_types import ADAPTERS, LoraModule
from .adapter_types.diff import DIFF_SUFFIX
from .adapters import NOT_READ, Adapter, Module
from .errors import ProLoRAError
from .linalg import all_finite
from .projection import Factors
from .safetensors_io import SafetensorsReader

__all__ = ["LoraFile", "LoraModule", "Module", "module_tensors", "parse_state_dict", "read_lora", "split_module_key"]

CARRIED_SUFFIXES = (".diff_b", ".w_norm", ".b_norm")
DORA_SUFFIX = ".dora_scale"
ALPHA_SUFFIX = ".alpha"
#: Every suffix ComfyUI's loader reads: each format's (in ComfyUI's order), then the module's own parts.
KNOWN_SUFFIXES: tuple[str, ...] = (*(s for fmt in ADAPTERS for s in fmt.READS), *CARRIED_SUFFIXES, DORA_SUFFIX, ALPHA_SUFFIX)
#: Suffixes an output module may carry (what :func:`split_module_key` knows).
OUTPUT_SUFFIXES: tuple[str, ...] = (*(s for fmt in ADAPTERS for s in fmt.WRITES), *CARRIED_SUFFIXES, DORA_SUFFIX, ALPHA_SUFFIX)

#: Adapter parts recognised but not handled yet: (substring of the key, what it is).
UNSUPPORTED_PARTS: tuple[tuple[str, str], ...] = (
    (".oft_", "OFT (oft_*)"),
    (".oft_blocks", "OFT (oft_blocks)"),
    (".boft_", "BOFT"),
    (".a1.weight", "GLoRA"),
    (".set_weight", "weight replacement (set_weight)"),
    (".reshape_weight", "weight padding (reshape_weight)"),
)


def unsupported_part(key: str) -> str | None:
    """What unsupported adapter part ``key`` is, or ``None``.

    A part matches whole name components only: ``.set_weight`` matches ``m.set_weight`` but not
    ``m.set_weights_x``; parts ending in ``_`` (``.oft_``) are prefixes of a component.
    """
    for part, what in UNSUPPORTED_PARTS:
        if part.endswith("_"):
            if part in key:
                return what
        elif key.endswith(part) or part + "." in key:
            return what
    return None


def split_module_key(key: str) -> tuple[str, str]:
    """``(module, suffix)`` of an output key (``("m", ".lora_up.weight")``); ``(key, "")`` when the
    suffix is not one the engine writes."""
    for suffix in OUTPUT_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    return key, ""


@dataclass
class LoraFile:
    """A parsed LoRA: its modules, its metadata, its dtype, and every key it holds that no module
    uses, with the reason (``unused``: key → reason)."""

    path: Path | None
    modules: dict[str, Module]
    metadata: dict[str, str] = field(default_factory=dict)
    unused: dict[str, str] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32

    @property
    def unknown_keys(self) -> list[str]:
        """The keys no module uses, sorted."""
        return sorted(self.unused)


ALPHA_ONLY = "an alpha with no weight update in its module (ComfyUI applies nothing for it)"
_PEFT_NAMED = re.compile(r"\.lora_[AB]\.([^.]+)\.weight$")


def _why_unused(key: str) -> str:
    """The reason a key with no known suffix is not used."""
    named = _PEFT_NAMED.search(key)
    if named is not None and named.group(1) != "default":
        return (f"PEFT adapter '{named.group(1)}': ComfyUI 0.3.75 reads only the adapter named 'default' "
                "(lora_A.default / lora_B.default) and would skip it")
    return NOT_READ


def _label(path: Path | None) -> str:
    return str(path) if path is not None else "<LoRA>"


def _split_known(key: str) -> tuple[str, str] | None:
    for suffix in KNOWN_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    return None


def parse_state_dict(state: dict[str, Tensor], path: Path | None = None, metadata: dict[str, str] | None = None) -> LoraFile:
    """Group ``state`` into :class:`Module` s, validating each (shapes, ranks, dtype, finiteness)."""
    where = _label(path)
    if not state:
        raise ProLoRAError("the file holds no tensors", file=where)
    for key in state:
        what = unsupported_part(key)
        if what is not None:
            raise ProLoRAError(f"{what} is not supported yet (ComfyUI applies it; the whole file is refused rather than transferred "
                               "in part); LoRA, LoCon, LoHa, LoKr, DoRA and diff parts are", file=where, key=key)
    grouped: dict[str, dict[str, str]] = {}
    unused: dict[str, str] = {}
    for key in state:
        found = _split_known(key)
        if found is None:
            unused[key] = _why_unused(key)
        else:
            grouped.setdefault(found[0], {})[found[1]] = key
    modules: dict[str, Module] = {}
    for name in sorted(grouped):
        parts = grouped[name]
        for fmt in ADAPTERS:
            unused.update(fmt.set_aside(parts, where))
        if not parts:
            continue
        mod = _build(name, parts, state, where)
        if mod is None:
            unused.update({k: ALPHA_ONLY for k in grouped[name].values()})
        else:
            modules[name] = mod
    if not modules:
        shown = "; ".join(f"{k} ({unused[k]})" for k in sorted(unused)[:3])
        raise ProLoRAError(f"no LoRA module found (no up/down, lora_B/lora_A, LoHa, LoKr or diff parts ComfyUI reads); keys: {shown}",
                           file=where)
    dtypes = {t.dtype for m in modules.values() for t in _update_tensors(m)} or {t.dtype for m in modules.values() for t in m.carried.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    return LoraFile(path, modules, dict(metadata or {}), dict(sorted(unused.items())), dtype)


def _update_tensors(mod: Module) -> list[Tensor]:
    return [] if mod.update is None else mod.update.tensors()


def _check_tensor(t: Tensor, where: str, key: str) -> None:
    if not torch.is_floating_point(t):
        raise ProLoRAError(f"has integer dtype {str(t.dtype).removeprefix('torch.')}; LoRA factors must be floating point", file=where, key=key)
    if not all_finite(t):
        bad = "NaN" if bool(torch.isnan(t.float()).any()) else "Inf"
        raise ProLoRAError(f"contains {bad} values", file=where, key=key)


def _build(name: str, parts: dict[str, str], state: dict[str, Tensor], where: str) -> Module | None:
    """One module from its keys by suffix; ``None`` when it holds nothing but an alpha."""
    for suffix, key in parts.items():
        if suffix != ALPHA_SUFFIX:
            _check_tensor(state[key], where, key)
    alpha = _alpha(state, parts[ALPHA_SUFFIX], where) if ALPHA_SUFFIX in parts else None
    diff = state[parts[DIFF_SUFFIX]] if DIFF_SUFFIX in parts else None
    present = {label: (fmt, key) for fmt in ADAPTERS for label, key in fmt.claims(parts, state).items()}
    if len(present) > 1:
        raise ProLoRAError(f"one module mixes adapter types ({', '.join(present)})", file=where, key=list(present.values())[1][1])
    update: Adapter | None = None
    if present:
        label, (fmt, _) = next(iter(present.items()))
        update = fmt.parse(name, label, parts, state, alpha, where)
    carried = {s: state[parts[s]] for s in CARRIED_SUFFIXES if s in parts}
    if diff is not None and diff.ndim < 2:
        carried[DIFF_SUFFIX] = diff
    dora = state[parts[DORA_SUFFIX]] if DORA_SUFFIX in parts else None
    if dora is not None and update is None:
        raise ProLoRAError("a DoRA magnitude (dora_scale) without a weight update in its module", file=where, key=parts[DORA_SUFFIX])
    if update is None and not carried:
        return None
    return Module(name, update, dora, parts.get(DORA_SUFFIX), carried)


def _alpha(state: dict[str, Tensor], key: str, where: str) -> float:
    a = state[key]
    if a.numel() != 1 or not (torch.is_floating_point(a) or a.dtype in (torch.int32, torch.int64, torch.int16)):
        raise ProLoRAError(f"alpha must be a scalar, got shape {list(a.shape)} dtype {a.dtype}", file=where, key=key)
    alpha = float(a.reshape(()))
    if not math.isfinite(alpha) or alpha <= 0:
        comfy = "" if not math.isfinite(alpha) else " (ComfyUI would apply it as alpha / rank: a zero or sign-flipped update)"
        raise ProLoRAError(f"alpha must be a finite positive number, got {alpha:g}{comfy}", file=where, key=key)
    return alpha


def read_lora(path: str | Path) -> LoraFile:
    """Read and validate a LoRA safetensors file."""
    reader = SafetensorsReader(path)
    state = {k: reader.get(k) for k in reader.keys()}
    return parse_state_dict(state, reader.path, reader.header.metadata)


def module_tensors(name: str, factors: Factors, like: LoraModule | tuple[int, ...], dtype: torch.dtype) -> dict[str, Tensor]:
    """Kohya-dotted tensors for one output module, shaped like ``like``: a layout (the input LoRA
    module's own, :meth:`.adapters.Adapter.output_layout`, or the base weight's shape; 4-D gets LoCon
    conv factors ``[out, r, 1, 1]`` / ``[r, in, kh, kw]``), or a LoRA module (its layout).

    ``alpha = scale · rank_out`` so that ComfyUI's ``alpha / rank`` gives back exactly ``scale``.
    """
    r = factors.rank
    up, down = factors.up, factors.down
    layout = like if isinstance(like, tuple) else like.layout
    if len(layout) == 4:
        up = up.reshape(up.shape[0], r, 1, 1)
        down = down.reshape(r, *layout[1:])
    return {
        f"{name}.lora_up.weight": up.to("cpu", dtype).contiguous(),
        f"{name}.lora_down.weight": down.to("cpu", dtype).contiguous(),
        f"{name}.alpha": torch.tensor(factors.scale * r, dtype=torch.float32),
    }
