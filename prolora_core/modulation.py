"""Modulation layers, reported as their own group.

In DiT families each block has a linear map from the conditioning vector to its adaLN shift, scale
and gate (Flux: ``img_mod.lin`` / ``txt_mod.lin`` ``[6h, h]`` in double blocks, ``modulation.lin``
``[3h, h]`` in single blocks, ``final_layer.adaLN_modulation.1``; Qwen-Image ``img_mod.1``; diffusers
names ``norm1.linear``, ``norm1_context.linear``, ``norm.linear``; FLUX.2 has no per-block ones but three
shared by all blocks: ``double_stream_modulation_img/txt.lin``, ``single_stream_modulation.lin``). Their Φ is read apart from the
attention and MLP weights, and some targets drop them: Chroma replaces Flux's per-block modulation
with one shared approximator, so a Flux LoRA's modulation modules have no weight there ("not in
target"), while the rest of the LoRA transfers.
"""
from __future__ import annotations

from typing import Iterable

from .slices import parse_place

#: Module names (last components) of modulation layers, as base weights and as diffusers LoRA names.
MODULATION_MODULES: tuple[str, ...] = (
    "img_mod.lin", "txt_mod.lin", "modulation.lin", "adaLN_modulation.1", "img_mod.1", "txt_mod.1",
    "norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear",
    "double_stream_modulation_img.lin", "double_stream_modulation_txt.lin", "single_stream_modulation.lin",  # FLUX.2: shared by all blocks
)


def is_modulation(key: str) -> bool:
    """Whether a weight key (or slice key, or LoRA module name) names a modulation layer."""
    s = parse_place(key)
    name = (s.key if s is not None else key).removesuffix(".weight")
    return any(name == m or name.endswith("." + m) or name.endswith("_" + m.replace(".", "_")) for m in MODULATION_MODULES)


def modulation_line(modules: Iterable[tuple[str, float | None, bool, bool]]) -> str | None:
    """One report line for the modulation group, or ``None`` when the LoRA touches none.

    ``modules``: per module ``(weight key or name, Φ = min(Φ_U, Φ_V) or None, transferred or
    passing, has a weight in the target)``; only modulation layers are counted.
    """
    group = [m for m in modules if is_modulation(m[0])]
    if not group:
        return None
    phis = sorted(p for _, p, _, _ in group if p is not None)
    line = (f"modulation layers ({len(group)}): transferred {sum(ok for _, _, ok, _ in group)}, "
            f"not in target {sum(not there for _, _, _, there in group)}")
    if phis:
        line += f", Φ (min of U/V) min {phis[0]:.3f}, median {phis[len(phis) // 2]:.3f}, max {phis[-1]:.3f}"
    return line
