"""LoRA files in and out: parsing the key formats into adapted modules, and writing them back.

In, per module, the spellings ComfyUI 0.3.75's ``comfy.weight_adapter`` reads (see :mod:`.adapters`
for each type's math):

* LoRA factors, ``<m>`` + (up suffix, down suffix), in ComfyUI's order of preference:
  kohya-dotted ``.lora_up.weight`` / ``.lora_down.weight`` (also ComfyUI-native
  ``diffusion_model.<m>…`` and kohya-underscore names ``lora_unet_a_b``); diffusers' legacy
  attention processors ``<m>_lora.up.weight`` / ``_lora.down.weight`` (``…attn1.processor.to_q``,
  module ``…processor.to_q``); PEFT ``.lora_B.weight`` / ``.lora_A.weight``; diffusers
  ``.lora.up.weight`` / ``.lora.down.weight``; Mochi ``.lora_B`` / ``.lora_A``; transformers
  ``.lora_linear_layer.up.weight`` / ``.down.weight``; PEFT with its adapter name
  ``.lora_B.default.weight`` / ``.lora_A.default.weight`` (ComfyUI reads the adapter named
  ``default`` only). LoCon conv (down ``[r, in, kh, kw]``, up ``[out, r, 1, 1]``), LoCon Tucker
  (``.lora_mid.weight``, folded into down). Any rank, also above ``min(m, n)``.
* LoHa (``.hada_w1_a/b``, ``.hada_w2_a/b``, Tucker cores ``.hada_t1/t2``), LoKr (``.lokr_w1`` or
  ``.lokr_w1_a/b``, ``.lokr_w2`` or ``.lokr_w2_a/b`` with an optional Tucker core ``.lokr_t2``), a
  full difference ``.diff`` (2-D/4-D).
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

from .adapters import FullDiff, LoHa, LoKr, LoraModule, Module, Update, fold_tucker
from .errors import ProLoRAError
from .linalg import all_finite
from .projection import Factors
from .safetensors_io import SafetensorsReader

__all__ = ["LoraFile", "LoraModule", "Module", "module_tensors", "parse_state_dict", "read_lora", "split_module_key"]

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
LOKR_SUFFIXES = (".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b")
LOKR_TUCKER = ".lokr_t2"
DIFF_SUFFIX = ".diff"
CARRIED_SUFFIXES = (".diff_b", ".w_norm", ".b_norm")
DORA_SUFFIX = ".dora_scale"
ALPHA_SUFFIX = ".alpha"
KNOWN_SUFFIXES: tuple[str, ...] = (
    *(s for pair in FACTOR_SUFFIXES for s in pair), MID_SUFFIX, *LoHa.SUFFIXES, *LoHa.TUCKER, *LOKR_SUFFIXES, LOKR_TUCKER, DIFF_SUFFIX,
    *CARRIED_SUFFIXES, DORA_SUFFIX, ALPHA_SUFFIX,
)
#: Suffixes an output module may carry (what :func:`split_module_key` knows).
OUTPUT_SUFFIXES: tuple[str, ...] = (".lora_up.weight", ".lora_down.weight", *LoHa.SUFFIXES, *LoHa.TUCKER, *LOKR_SUFFIXES, DIFF_SUFFIX,
                                    *CARRIED_SUFFIXES, DORA_SUFFIX, ALPHA_SUFFIX)

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


#: Why a key is not used, when its name ends in no suffix ComfyUI's loader reads.
NOT_READ = "not a part ComfyUI's LoRA loader reads (ComfyUI would log 'lora key not loaded' and skip it)"
ALPHA_ONLY = "an alpha with no weight update in its module (ComfyUI applies nothing for it)"
#: LoKr with a Tucker core: ComfyUI 0.3.75 forms ``w2`` by an einsum whose result is not contiguous,
#: ``torch.kron`` then raises, and ComfyUI logs "ERROR lokr …" and leaves the weight unchanged.
LOKR_TUCKER_FAILS = ("LoKr with a Tucker core (lokr_t2): ComfyUI 0.3.75 fails on it (torch.kron of the non-contiguous "
                     "Tucker product; it logs 'ERROR lokr' and leaves the weight unchanged), so nothing of this module is applied")
LOKR_TUCKER_IGNORED = "a LoKr Tucker core next to a whole lokr_w2: ComfyUI uses lokr_w2 and ignores the core"
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
        if LOKR_TUCKER in parts:
            core = parts.pop(LOKR_TUCKER)
            if ".lokr_w2" not in parts and (".lokr_w2_a" in parts or ".lokr_w2_b" in parts):
                unused.update({k: LOKR_TUCKER_FAILS for k in (core, *parts.values())})
                continue
            unused[core] = LOKR_TUCKER_IGNORED if ".lokr_w2" in parts else NOT_READ
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
    u = mod.update
    if isinstance(u, LoraModule):
        return [u.up, u.down]
    if isinstance(u, (LoHa, LoKr)):
        return list(u.parts.values())
    if isinstance(u, FullDiff):
        return [u.diff]
    return []


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
    types = {f"LoRA {up_s.removeprefix('.')}": (up_s, down_s) for up_s, down_s in FACTOR_SUFFIXES}
    types.update({"LoHa": LoHa.SUFFIXES + LoHa.TUCKER, "LoKr": LOKR_SUFFIXES, "diff": (DIFF_SUFFIX,) if diff is not None and diff.ndim >= 2 else ()})
    present = {kind: next(parts[s] for s in suffixes if s in parts) for kind, suffixes in types.items() if any(s in parts for s in suffixes)}
    if len(present) > 1:
        raise ProLoRAError(f"one module mixes adapter types ({', '.join(present)})", file=where, key=list(present.values())[1])
    if MID_SUFFIX in parts and FACTOR_SUFFIXES[0][0] not in parts:
        raise ProLoRAError("a Tucker core (lora_mid) needs lora_up/lora_down factors (ComfyUI reads it only next to those and "
                           "would apply this module without it)", file=where, key=parts[MID_SUFFIX])
    kind = next(iter(present), None)
    update: Update | None = None
    if kind == "LoHa":
        update = _loha(state, parts, alpha, where)
    elif kind == "LoKr":
        update = _lokr(state, parts, alpha, where)
    elif kind == "diff":
        update = FullDiff(state[parts[DIFF_SUFFIX]], parts[DIFF_SUFFIX])
    elif kind is not None:
        up_s, down_s = types[kind]
        update = _lora(name, state, parts, up_s, down_s, alpha, where)
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


def _lora(name: str, state: dict[str, Tensor], parts: dict[str, str], up_s: str, down_s: str, alpha: float | None, where: str) -> LoraModule:
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
        raise ProLoRAError(f"up and down ranks disagree: up {list(up.shape)} has rank {up.shape[1]}, down {list(down.shape)} has rank {down.shape[0]}", file=where, key=up_key)
    if down.shape[0] == 0:
        raise ProLoRAError("has rank 0", file=where, key=down_key)
    if MID_SUFFIX in parts:
        mid, r = state[parts[MID_SUFFIX]], int(down.shape[0])
        if down.ndim != 4 or tuple(down.shape[2:]) != (1, 1) or mid.ndim != 4 or tuple(mid.shape[:2]) != (r, r):
            raise ProLoRAError(f"a Tucker core must be [r, r, kh, kw] on a [r, in, 1, 1] down factor; got mid {list(mid.shape)}, "
                               f"down {list(down.shape)}", file=where, key=parts[MID_SUFFIX])
        down = fold_tucker(down, mid)
    return LoraModule(name, up, down, alpha, up_key, down_key)


def _fits(cond: bool, what: str, shapes: dict[str, Tensor], where: str, key: str) -> None:
    if not cond:
        shown = ", ".join(f"{s.removeprefix('.')} {list(t.shape)}" for s, t in shapes.items())
        raise ProLoRAError(f"{what} factors do not fit together: {shown}", file=where, key=key)


def _loha(state: dict[str, Tensor], parts: dict[str, str], alpha: float | None, where: str) -> LoHa:
    tucker = any(s in parts for s in LoHa.TUCKER)
    wanted = LoHa.SUFFIXES + (LoHa.TUCKER if tucker else ())
    missing = [s.removeprefix(".") for s in wanted if s not in parts]
    first = next(parts[s] for s in wanted if s in parts)
    if missing:
        raise ProLoRAError(f"LoHa module lacks {', '.join(missing)}", file=where, key=first)
    t = {s: state[parts[s]] for s in wanted}
    w1a, w1b, w2a, w2b = (t[s] for s in LoHa.SUFFIXES)
    two_d = all(t[s].ndim == 2 for s in LoHa.SUFFIXES) and w1b.shape[0] > 0
    if tucker:  # w_a [r, out], w_b [r, in], t [r, r, kh, kw]
        t1, t2 = t[".hada_t1"], t[".hada_t2"]
        ok = two_d and t1.ndim == t2.ndim == 4 and all(
            c.shape[0] == a.shape[0] and c.shape[1] == b.shape[0] for c, a, b in ((t1, w1a, w1b), (t2, w2a, w2b)))
        ok = ok and w1a.shape[1] == w2a.shape[1] and w1b.shape[1] == w2b.shape[1] and t1.shape[2:] == t2.shape[2:]
    else:
        ok = two_d and w1a.shape[1] == w1b.shape[0] and w2a.shape[1] == w2b.shape[0]
        ok = ok and w1a.shape[0] == w2a.shape[0] and w1b.shape[1] == w2b.shape[1]
    _fits(ok, "LoHa", t, where, first)
    return LoHa(t, alpha, first)


def _lokr(state: dict[str, Tensor], parts: dict[str, str], alpha: float | None, where: str) -> LoKr:
    first = next(parts[s] for s in LOKR_SUFFIXES if s in parts)
    t: dict[str, Tensor] = {}
    for i in (1, 2):
        whole, a, b = f".lokr_w{i}", f".lokr_w{i}_a", f".lokr_w{i}_b"
        if whole in parts:  # ComfyUI uses a whole side when there is one
            t[whole] = state[parts[whole]]
            _fits(t[whole].ndim == 2 or (i == 2 and t[whole].ndim == 4), "LoKr", {whole: t[whole]}, where, parts[whole])
        elif a in parts and b in parts:
            t[a], t[b] = state[parts[a]], state[parts[b]]
            _fits(t[a].ndim == t[b].ndim == 2 and t[a].shape[1] == t[b].shape[0] > 0, "LoKr", {a: t[a], b: t[b]}, where, parts[a])
        else:
            raise ProLoRAError(f"LoKr module lacks w{i} (lokr_w{i}, or lokr_w{i}_a and lokr_w{i}_b)", file=where, key=first)
    return LoKr(t, alpha, first)


def read_lora(path: str | Path) -> LoraFile:
    """Read and validate a LoRA safetensors file."""
    reader = SafetensorsReader(path)
    state = {k: reader.get(k) for k in reader.keys()}
    return parse_state_dict(state, reader.path, reader.header.metadata)


def module_tensors(name: str, factors: Factors, like: LoraModule | tuple[int, ...], dtype: torch.dtype) -> dict[str, Tensor]:
    """Kohya-dotted tensors for one output module, shaped like ``like``: the input LoRA module, or
    the base weight's shape (a 4-D weight gets LoCon conv factors ``[out, r, 1, 1]`` /
    ``[r, in, kh, kw]``).

    ``alpha = scale · rank_out`` so that ComfyUI's ``alpha / rank`` gives back exactly ``scale``.
    """
    r = factors.rank
    up, down = factors.up, factors.down
    layout = like.layout if isinstance(like, LoraModule) else tuple(like)
    if len(layout) == 4:
        up = up.reshape(up.shape[0], r, 1, 1)
        down = down.reshape(r, *layout[1:])
    return {
        f"{name}.lora_up.weight": up.to("cpu", dtype).contiguous(),
        f"{name}.lora_down.weight": down.to("cpu", dtype).contiguous(),
        f"{name}.alpha": torch.tensor(factors.scale * r, dtype=torch.float32),
    }
