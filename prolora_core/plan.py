"""Plan: place each LoRA module on a weight of the source base, and check that it fits there."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .adapters import Module, dora_on_output_axis
from .errors import ProLoRAError
from .lora import LoraFile
from .names import BaseIndex
from .slices import WeightSlice, parse_place
from .weights import WeightSource

@dataclass(frozen=True)
class Planned:
    """A LoRA module placed on a source weight (``source_key=None``: no base weight found)."""

    lora_index: int
    module: Module
    source_key: str | None


def plan_by_names(loras: Sequence[LoraFile], source: WeightSource) -> list[Planned]:
    """Place each LoRA module on ``<module>.weight`` of the source file (prefixes, kohya underscores)."""
    index = BaseIndex(source.keys())
    plan = [Planned(i, mod, index.resolve(mod.name)) for i, lora in enumerate(loras) for mod in lora.modules.values()]
    for i, lora in enumerate(loras):
        mine = [p for p in plan if p.lora_index == i]
        if mine and all(p.source_key is None for p in mine):
            raise ProLoRAError(f"none of the LoRA's {len(mine)} modules has a weight in the source base {source.label} (e.g. '{mine[0].module.name}')",
                               file=lora.path or "<LoRA>")
    return plan


def check_fits(lora: LoraFile, mod: Module, weight_shape: tuple[int, ...], base_label: str) -> None:
    """Refuse a LoRA module whose shape does not fit its base weight, saying why. Fits what ComfyUI
    applies: the update's ``m × n`` equals the weight's ``out × in·kh·kw`` (any rank, any factor
    layout); a ``.diff`` has the weight's own shape."""
    where = lora.path or "<LoRA>"
    shape = tuple(int(d) for d in weight_shape)
    u = mod.update
    if u is not None and len(shape) < 2:
        raise ProLoRAError(f"a weight update on the 1-D weight {list(shape)} of {base_label}", file=where, key=u.key)
    # A LoRA's factors may be 2-D on a conv weight or 4-D on a linear one: ComfyUI multiplies the
    # flattened factors and reshapes the product to the weight, so only the matrix shapes must agree.
    if u is not None and not u.fits(shape):
        raise ProLoRAError(
            f"LoRA update is {u.matrix_shape[0]}×{u.matrix_shape[1]} but the weight in {base_label} is {list(shape)}: "
            "this looks like a LoRA for another base model", file=where, key=u.key)
    if mod.dora_scale is not None and mod.dora_scale.numel() != shape[0 if dora_on_output_axis(mod.dora_scale, shape) else 1]:
        raise ProLoRAError(f"DoRA magnitude of shape {list(mod.dora_scale.shape)} fits neither the rows nor the input channels of "
                           f"the weight {list(shape)} in {base_label}", file=where, key=mod.dora_key)
    for suffix, t in mod.carried.items():
        want = (shape[0],) if suffix in (".diff_b", ".b_norm") else shape
        if tuple(t.shape) != want:
            raise ProLoRAError(f"has shape {list(t.shape)} but the weight in {base_label} is {list(shape)} (needs {list(want)}): "
                               "this looks like a LoRA for another base model", file=where, key=mod.name + suffix)


def split_blocks(plan: Sequence[Planned]) -> list[Planned]:
    """``plan`` with each block-diagonal LoRA module on a whole weight (kohya ``split_qkv``:
    :mod:`.adapter_types.block_diagonal`) replaced by its blocks, each on its rows of the weight (a
    slice, ``<key>[0:start:rows]``), so each block is matched and projected with its own rows' bases
    and written back block-diagonal. Modules with a DoRA magnitude or 1-D parts, conv modules and
    modules already on a slice stay whole. Call after :func:`check_fits`."""
    out: list[Planned] = []
    for p in plan:
        mod = p.module
        whole = p.source_key is not None and parse_place(p.source_key) is None and mod.dora_scale is None and not mod.carried
        blocks = mod.update.row_blocks() if whole and mod.update is not None else None
        if blocks is None:
            out.append(p)
            continue
        out.extend(Planned(p.lora_index, Module(mod.name, block), WeightSlice(p.source_key, 0, start, rows).virtual_key)  # type: ignore[arg-type]
                   for start, rows, block in blocks)
    return out
