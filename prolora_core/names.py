"""Pairing LoRA module names with the ``<module>.weight`` keys of a base safetensors file.

A LoRA module ``<m>`` pairs with ``<m>.weight``, also when the two differ by a known prefix
(``diffusion_model.``, ``model.diffusion_model.``, ``unet.``, PEFT's ``base_model.model.``) or when
the LoRA uses kohya's underscore naming (``lora_unet_a_b_c`` for ``a.b.c``). This is the headless
engine's scope: real checkpoints whose LoRAs use another naming scheme (kohya's diffusers-style
``lora_unet_down_blocks_…`` against LDM ``input_blocks…``) go through ComfyUI's own key mapping in
the nodes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

#: Prefixes a base file may put before module names.
BASE_PREFIXES: tuple[str, ...] = ("model.diffusion_model.", "diffusion_model.", "unet.", "base_model.model.", "model.")
#: Prefixes a LoRA may put before module names (kohya underscore prefixes included).
LORA_PREFIXES: tuple[str, ...] = (
    "base_model.model.", "model.diffusion_model.", "diffusion_model.", "unet.",
    "lora_unet_", "lora_te1_", "lora_te2_", "lora_te_",
)
WEIGHT_SUFFIX = ".weight"


def strip_prefix(name: str, prefixes: Iterable[str]) -> tuple[str, str]:
    """``(prefix, rest)`` for the first matching prefix (``""`` when none)."""
    for p in prefixes:
        if name.startswith(p):
            return p, name[len(p):]
    return "", name


def underscore(name: str) -> str:
    return name.replace(".", "_")


@dataclass(frozen=True)
class NameStyle:
    """How a LoRA spells module names: its prefix and whether dots became underscores."""

    prefix: str
    underscored: bool

    def encode(self, module: str) -> str:
        """The LoRA-style name of a bare module name (``input_blocks.1.1.proj_in``)."""
        return self.prefix + (underscore(module) if self.underscored else module)


class BaseIndex:
    """Module names of one base file, looked up by bare dotted name or by underscore form."""

    def __init__(self, weight_keys: Iterable[str]) -> None:
        self.by_bare: dict[str, str] = {}
        self.by_underscore: dict[str, str | None] = {}
        for key in weight_keys:
            if not key.endswith(WEIGHT_SUFFIX):
                continue
            _, bare = strip_prefix(key[: -len(WEIGHT_SUFFIX)], BASE_PREFIXES)
            self.by_bare.setdefault(bare, key)
            u = underscore(bare)
            # Two modules whose underscore forms collide are ambiguous: mark and refuse them.
            self.by_underscore[u] = key if u not in self.by_underscore else None

    def bare_name(self, key: str) -> str:
        """``model.diffusion_model.a.b.weight`` → ``a.b``."""
        return strip_prefix(key.removesuffix(WEIGHT_SUFFIX), BASE_PREFIXES)[1]

    def resolve(self, lora_name: str) -> str | None:
        """The base weight key for a LoRA module name, or ``None``."""
        _, bare = strip_prefix(lora_name, LORA_PREFIXES)
        bare = processor_module(bare)
        if bare in self.by_bare:
            return self.by_bare[bare]
        return self.by_underscore.get(underscore(bare))

    def find_bare(self, bare: str) -> str | None:
        """The weight key of a bare module name, with this file's own prefix."""
        return self.by_bare.get(bare)


def processor_module(name: str) -> str:
    """The module of a diffusers legacy attention-processor name, as ComfyUI's key map spells it
    (``….attn1.processor.to_q`` → ``….attn1.to_q``, ``….processor.to_out`` → ``….to_out.0``);
    other names unchanged."""
    head, sep, tail = name.rpartition(".processor.")
    if not sep or not tail.startswith("to_") or "." in tail:
        return name
    return f"{head}.{tail}.0" if tail == "to_out" else f"{head}.{tail}"


def name_style(lora_name: str) -> NameStyle:
    prefix, bare = strip_prefix(lora_name, LORA_PREFIXES)
    return NameStyle(prefix, underscored=prefix.endswith("_") or ("." not in bare and "_" in bare))
