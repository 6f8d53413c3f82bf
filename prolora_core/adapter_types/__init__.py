"""The adapter formats, one file each, imported in the order ComfyUI 0.3.75's
``comfy.weight_adapter.adapters`` tries them (LoRA, LoHa, LoKr; a ``.diff`` is read after the
adapters in ``comfy.lora.load_lora``). Importing a file registers its format
(:func:`..adapters.register`); :data:`ADAPTERS` is the registry in that order."""
from __future__ import annotations

from ..adapters import ADAPTERS, Adapter
from .lora import LoraModule, fold_tucker
from .loha import LoHa, tucker_factor
from .lokr import LoKr
from .diff import FullDiff

__all__ = ["ADAPTERS", "Adapter", "FullDiff", "LoHa", "LoKr", "LoraModule", "fold_tucker", "tucker_factor"]
