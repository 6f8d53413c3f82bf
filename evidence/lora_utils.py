"""LoRA training and application on the tiny UNet, with kohya ``lora_unet_<ldm underscore>`` keys.

Targets: in every SpatialTransformer ``proj_in`` / ``proj_out`` (1×1 convs in the SD1.5 layout,
LoCon-style 4-D factors), and in its BasicTransformerBlock ``attn1`` / ``attn2``
``to_q`` / ``to_k`` / ``to_v`` / ``to_out.0`` and ``ff.net.0.proj`` / ``ff.net.2``.
``ΔW = (alpha / r) · up @ down``; training adds it to the frozen weights through
``torch.func.functional_call`` (see :func:`evidence.models.eps_prediction`).
"""
from __future__ import annotations

import re

import torch

TARGET_RE = re.compile(
    r"\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|transformer_blocks\.\d+\.ff\.net\.(0\.proj|2))\.weight$")


def target_modules(state: dict[str, torch.Tensor]) -> list[str]:
    """Bare module names (``input_blocks.1.1.proj_in``) a LoRA adapts, sorted."""
    return sorted(k[: -len(".weight")] for k in state if TARGET_RE.search(k))


def kohya_name(bare: str) -> str:
    return "lora_unet_" + bare.replace(".", "_")


def init_lora(state: dict[str, torch.Tensor], rank: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{bare: (down, up)}``; down ~ N(0, 1/n) (2-D, flattened for convs), up = 0 (kohya-style)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in target_modules(state):
        w = state[name + ".weight"]
        m, n = w.shape[0], w[0].numel()
        down = torch.randn(rank, n, generator=gen) / n ** 0.5
        out[name] = (down.requires_grad_(), torch.zeros(m, rank, requires_grad=True))
    return out


def merged_params(state: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replacement parameters ``W + ΔW`` for the adapted modules (bare names → tensors)."""
    return {name + ".weight": state[name + ".weight"] + d.reshape(state[name + ".weight"].shape) for name, d in deltas.items()}


def lora_deltas(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float) -> dict[str, torch.Tensor]:
    return {name: scale * (up @ down) for name, (down, up) in factors.items()}


def to_kohya(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], state: dict[str, torch.Tensor], alpha: float,
             dtype=torch.float16) -> dict[str, torch.Tensor]:
    """Kohya tensors (``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``; convs stay 4-D)."""
    out = {}
    for name, (down, up) in factors.items():
        w = state[name + ".weight"]
        r = down.shape[0]
        d, u = down.detach(), up.detach()
        if w.ndim == 4:
            d = d.reshape(r, *w.shape[1:])
            u = u.reshape(u.shape[0], r, 1, 1)
        key = kohya_name(name)
        out[key + ".lora_down.weight"] = d.to(dtype).contiguous()
        out[key + ".lora_up.weight"] = u.to(dtype).contiguous()
        out[key + ".alpha"] = torch.tensor(float(alpha))
    return out


def deltas_from_kohya(lora: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dense ``ΔW`` per bare module name from kohya tensors (``alpha / rank`` scale, ComfyUI's rule).

    Raises on a module that matches no weight of ``state`` (the LoRA is for another model).
    """
    by_kohya = {kohya_name(k[: -len(".weight")]): k[: -len(".weight")] for k in state if k.endswith(".weight")}
    out = {}
    for key in lora:
        if not key.endswith(".lora_down.weight"):
            continue
        stem = key[: -len(".lora_down.weight")]
        name = by_kohya.get(stem)
        if name is None:
            raise KeyError(f"LoRA module {stem} has no weight in the model")
        down = lora[key].float()
        up = lora[stem + ".lora_up.weight"].float()
        r = down.shape[0]
        alpha = lora.get(stem + ".alpha")
        scale = float(alpha) / r if alpha is not None else 1.0
        d = scale * (up.reshape(up.shape[0], -1) @ down.reshape(r, -1))
        out[name] = d.reshape(state[name + ".weight"].shape)
    return out
