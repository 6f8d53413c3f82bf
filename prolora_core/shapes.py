"""The one message for models whose shapes cannot match.

ProLoRA moves a LoRA between models of the same shapes (a base and its fine-tune, distillation or
sibling: Wan 2.1 → Wan 2.2 A14B, Flux.1-dev → Krea). Between sizes or families (Wan 1.3B ↔ 14B,
Wan 2.2 5B, Qwen-Image ↔ Wan, SD1.5 ↔ SDXL) no weight the LoRA touches has a counterpart of its
shape, and per-module "another shape" lines would hide that: the graph nodes, the files node and
the CLI say it once, naming both models (their family as the host detected it, and their sizes).
No model family is known here: the caller's ``describe`` names a model.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .errors import ProLoRAError
from .linalg import matrix_shape
from .names import BaseIndex
from .slices import parse_place
from .weights import WeightSource

#: config entries that give a transformer's or UNet's width, in the order they are looked for.
WIDTH_KEYS = ("dim", "hidden_size", "model_channels")
SAME_SHAPE = "shapes differ: this method needs same-shape models (the same family and size: a base and its fine-tune or distillation)"


def describe_model(kind: str, parameters: int, config: Mapping[str, Any] | None = None) -> str:
    """``WAN21_T2V (14.3 B parameters, dim 5120)``: ``kind`` (ComfyUI's model config class, or the
    file's name when no family was detected), the diffusion model's parameter count and its width
    when ``config`` (a ``unet_config``) names one."""
    size = f"{parameters / 1e9:.1f} B parameters" if parameters >= 1e9 else f"{parameters / 1e6:.2f} M parameters"
    config = config or {}
    width = next((f", {k.removesuffix('_channels')} {config[k]}" for k in WIDTH_KEYS if isinstance(config.get(k), int)), "")
    return f"{kind} ({size}{width})"


def parameter_count(weights: WeightSource, prefix: str = "") -> int:
    """Entries of the weights whose key starts with ``prefix`` (shapes only; nothing is read)."""
    return sum(math.prod(weights.shape(k)) for k in weights.keys() if k.startswith(prefix))


def _shape(part: WeightSource, key: str | None) -> tuple[int, ...] | None:
    if key is None:
        return None
    try:
        return tuple(part.shape(key))
    except (KeyError, ProLoRAError):
        return None


def _same_name(source: WeightSource, target: WeightSource) -> Callable[[str], str | None]:
    """The target key of the same name as a source key, as name pairing finds it (the key itself,
    else through the prefixes :class:`.names.BaseIndex` knows: a checkpoint against a bare
    diffusion-model or GGUF file); a slice's virtual key keeps its slice."""
    keys = set(target.keys())
    sindex, tindex = BaseIndex(source.keys()), BaseIndex(target.keys())

    def find(key: str) -> str | None:
        piece = parse_place(key)
        whole = piece.key if piece is not None else key
        other = whole if whole in keys else tindex.find_bare(sindex.bare_name(whole))
        return other if other is None or piece is None else piece.on(other).virtual_key

    return find


def check_shapes_can_match(source: WeightSource, target: WeightSource, keys: Sequence[str], pairing: str, what: str,
                           describe: Callable[[WeightSource], str], absent_ok: bool = False) -> None:
    """Raise one :class:`ProLoRAError` naming both models (``describe(source)``,
    ``describe(target)``) when none of ``keys`` (source weights of two or more dimensions: the
    modules the LoRA touches, or all of them) has a target weight of its shape: by name, or anywhere
    in the target with ``pairing="similarity"``. ``what`` names the keys in the message ("the LoRA's
    22 modules"). A pair where some fit passes: the modules that do not are reported one by one.
    ``absent_ok``: a target that has none of the keys' names at all (plain files no family was
    detected in) passes too; its modules are reported "target has no weight of that name"."""
    matrices = [k for k in dict.fromkeys(keys) if len(source.shape(k)) >= 2]
    if not matrices:
        return
    shapes = {matrix_shape(target.shape(k)) for k in target.keys() if len(target.shape(k)) >= 2} if pairing == "similarity" else set()
    same_name = _same_name(source, target)
    for key in matrices:
        mine = matrix_shape(source.shape(key))
        theirs = _shape(target, same_name(key))
        if (theirs is not None and len(theirs) >= 2 and matrix_shape(theirs) == mine) or mine in shapes:
            return
    if absent_ok and pairing == "name" and all(_shape(target, same_name(k)) is None for k in matrices):
        return
    key = matrices[0]
    theirs = _shape(target, same_name(key))
    raise ProLoRAError(
        f"the source model is {describe(source)} and the target model is {describe(target)}: none of {what} has a weight of "
        f"its shape in the target (e.g. {key} is {list(source.shape(key))} in the source, "
        f"{list(theirs) if theirs is not None else 'absent'} in the target); {SAME_SHAPE}")


def check_lora_fits_somewhere(placed: Sequence[tuple[str, tuple[int, int], str]], source: WeightSource, lora_file: Any,
                              describe: Callable[[WeightSource], str]) -> None:
    """Raise one :class:`ProLoRAError` naming the source model when none of a LoRA's placed modules
    ``(module, update m × n, source key)`` has the shape of its weight (a LoRA for another size or
    family under the same names, e.g. a Wan 1.3B LoRA on Wan 14B). Some fitting: passes (the plan
    check names the others one by one)."""
    if len(placed) < 2 or any(matrix_shape(source.shape(key)) == mn for _, mn, key in placed):
        return
    name, (m, n), key = placed[0]
    raise ProLoRAError(
        f"the LoRA does not fit the source model {describe(source)}: none of its {len(placed)} modules has the shape of "
        f"its weight (e.g. '{name}' is {m}×{n}, the weight {key} is {list(source.shape(key))}): this looks like a LoRA for another "
        f"base model; {SAME_SHAPE}", file=lora_file, key=name)
