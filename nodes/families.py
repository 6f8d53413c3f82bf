"""Which model a basis handle holds, and the one message for a pair whose shapes cannot match
(the wording and the check live in :mod:`prolora_core.shapes`, shared with the files node and the
CLI; this module names a ComfyUI ``MODEL`` by its detected config class)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..prolora_core import shapes


def describe(part: Any) -> str:
    """``WAN21_T2V (14.3 B parameters, dim 5120)``: ComfyUI's detected model class (the
    ``supported_models`` config class), the diffusion model's parameter count, and its width when
    the config names one. ``part`` is a handle's weight source for the diffusion model."""
    patcher = getattr(part, "patcher", None)
    config = getattr(getattr(patcher, "model", None), "model_config", None)
    name = type(config).__name__ if config is not None else part.label
    return shapes.describe_model(name, shapes.parameter_count(part, "diffusion_model."), getattr(config, "unet_config", None))


def check_shapes_can_match(source: Any, target: Any, keys: Sequence[str], pairing: str, what: str) -> None:
    """:func:`prolora_core.shapes.check_shapes_can_match` with the models named by :func:`describe`."""
    shapes.check_shapes_can_match(source, target, keys, pairing, what, describe)
