"""Which model a basis handle holds, and the one message for a pair whose shapes cannot match.

ProLoRA moves a LoRA between models of the same shapes (a base and its fine-tune, distillation or
sibling: Wan 2.1 → Wan 2.2 A14B, Flux.1-dev → Krea). Between sizes or families (Wan 1.3B ↔ 14B,
Wan 2.2 5B, Qwen-Image ↔ Wan, SD1.5 ↔ SDXL) no weight the LoRA touches has a counterpart of its
shape, and the per-module "target weight has another shape" lines would hide that; Match Modules
says it once, naming both detected models and their sizes.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..prolora_core.errors import ProLoRAError
from ..prolora_core.linalg import matrix_shape

#: unet_config entries that give a transformer's or UNet's width, in the order they are looked for.
_WIDTH_KEYS = ("dim", "hidden_size", "model_channels")


def describe(part: Any) -> str:
    """``WAN21_T2V (14.3 B parameters, dim 5120)``: ComfyUI's detected model class (the
    ``supported_models`` config class), the diffusion model's parameter count, and its width when
    the config names one. ``part`` is a handle's weight source for the diffusion model."""
    patcher = getattr(part, "patcher", None)
    config = getattr(getattr(patcher, "model", None), "model_config", None)
    name = type(config).__name__ if config is not None else part.label
    count = sum(math.prod(part.shape(k)) for k in part.keys() if k.startswith("diffusion_model."))
    size = f"{count / 1e9:.1f} B parameters" if count >= 1e9 else f"{count / 1e6:.2f} M parameters"
    unet_config = getattr(config, "unet_config", None) or {}
    width = next((f", {k.removesuffix('_channels')} {unet_config[k]}" for k in _WIDTH_KEYS if isinstance(unet_config.get(k), int)), "")
    return f"{name} ({size}{width})"


def _shape(part: Any, key: str) -> tuple[int, ...] | None:
    try:
        return tuple(part.shape(key))
    except (KeyError, ProLoRAError):
        return None


def check_shapes_can_match(source: Any, target: Any, keys: Sequence[str], pairing: str, what: str) -> None:
    """Raise one :class:`ProLoRAError` naming both models when none of ``keys`` (source weights of
    two or more dimensions: the modules the LoRA touches, or all of them) has a target weight of
    its shape: by name, or anywhere in the target with ``pairing="similarity"``. ``what`` names
    the keys in the message ("the LoRA's 22 modules"). A pair where some fit passes: the modules
    that do not are reported one by one."""
    matrices = [k for k in dict.fromkeys(keys) if len(source.shape(k)) >= 2]
    if not matrices:
        return
    shapes = {matrix_shape(target.shape(k)) for k in target.keys() if len(target.shape(k)) >= 2} if pairing == "similarity" else set()
    for key in matrices:
        mine = matrix_shape(source.shape(key))
        theirs = _shape(target, key)
        if (theirs is not None and len(theirs) >= 2 and matrix_shape(theirs) == mine) or mine in shapes:
            return
    key = matrices[0]
    theirs = _shape(target, key)
    raise ProLoRAError(
        f"the source model is {describe(source)} and the target model is {describe(target)}: none of {what} has a weight of "
        f"its shape in the target (e.g. {key} is {list(source.shape(key))} in the source, "
        f"{list(theirs) if theirs is not None else 'absent'} in the target); shapes differ: this method needs same-shape models "
        "(the same family and size: a base and its fine-tune or distillation)")
