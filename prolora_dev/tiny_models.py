"""Tiny models built from ComfyUI's own classes, and the tiny-model file format.

The models are real ``comfy.model_patcher.ModelPatcher`` objects of ComfyUI's
``supported_models`` classes (SD15, SDXL, Flux, Chroma) with a few hundred thousand to a million
parameters, initialised deterministically by :func:`init_parameters_` (the one initialiser: the
zoo, the tests and the benchmarks all build with it).

**File format.** A safetensors file whose tensors are the diffusion model's weights under a key
prefix (``model.diffusion_model.`` by default, the checkpoint layout ComfyUI's
``state_dict_for_saving`` writes) and whose metadata holds ``prolora.model_kind`` (the
``supported_models`` class name), ``prolora.unet_config`` (its full ``unet_config`` as JSON) and
``prolora.key_prefix``. ComfyUI's own loaders cannot place models this small (they detect
architectures from real sizes), so the config travels in the file. There is one writer,
:func:`save_tiny_model`, and one reader, the pack's ``nodes.tiny_model_node.load_tiny_model``
(what the ``Load Tiny Model`` and ``Demo Models`` nodes use), reached here as
:func:`load_tiny_model`.

Call :func:`prolora_dev.host.configure_host` before building or loading (ComfyUI must be in CPU mode
before ``comfy.model_management`` is imported).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .host import pack_module

if TYPE_CHECKING:
    from comfy.model_patcher import ModelPatcher

KEY_PREFIX = "model.diffusion_model."

#: Width of the SDXL "pooled_output" (real SDXL: 1280, the CLIP-G projection).
SDXL_POOLED_DIM = 32
#: SDXL's ``encode_adm`` appends six 256-wide size/crop embeddings to the pooled output.
SDXL_ADM_IN_CHANNELS = SDXL_POOLED_DIM + 6 * 256

_COMMON_UNET: dict[str, Any] = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
    "use_temporal_resblock": False, "use_temporal_attention": False,
}

#: SD1.5 layout in miniature: attention at every level, conv proj_in/proj_out, no ADM, context_dim 32
#: (the zoo's architecture). ``supported_models.SD15`` adds ``num_heads=8, num_head_channels=-1``.
SD15_UNET_CONFIG: dict[str, Any] = {
    **_COMMON_UNET, "adm_in_channels": None, "context_dim": 32, "use_linear_in_transformer": False,
    "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1,
}

#: SDXL layout in miniature: no attention at the first level, 2-deep linear-proj transformers
#: below it, a "sequential" label embedding fed by pooled_output + 6x256 size embeddings.
#: SDXL keeps BASE's ``num_head_channels=64``, so attention needs >= 64 channels (level 1 has 64).
SDXL_UNET_CONFIG: dict[str, Any] = {
    **_COMMON_UNET, "num_classes": "sequential", "adm_in_channels": SDXL_ADM_IN_CHANNELS, "context_dim": 64,
    "use_linear_in_transformer": True,
    "transformer_depth": [0, 2], "transformer_depth_output": [0, 0, 2, 2], "transformer_depth_middle": 1,
}

#: Flux.1 in miniature (``comfy.ldm.flux.model.Flux``): hidden 64, 2 heads of 32 (axes_dim sums to 32),
#: one double and one single block, mlp_ratio 4 as in Flux.1, so ComfyUI's key map slices the fused
#: weights as for the real model: ``img_attn.qkv`` [192, 64] (q, k, v rows of 64), single-block
#: ``linear1`` [448, 64] (q, k, v, then ``proj_mlp`` 256 rows).
FLUX_UNET_CONFIG: dict[str, Any] = {
    "image_model": "flux", "in_channels": 4, "out_channels": 4, "vec_in_dim": 16, "context_in_dim": 32, "hidden_size": 64,
    "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000,
    "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
}

#: Chroma in miniature (``comfy.ldm.chroma.model.Chroma``): the tiny Flux's blocks without their
#: modulation layers (``img_mod``/``txt_mod``/``modulation.lin``), one shared approximator instead.
CHROMA_UNET_CONFIG: dict[str, Any] = {
    "image_model": "chroma", "in_channels": 16, "out_channels": 16, "context_in_dim": 32, "hidden_size": 64,
    "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000,
    "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 64, "hidden_dim": 32, "n_layers": 1,
}


def init_parameters_(module: torch.nn.Module, seed: int) -> None:
    """Deterministically overwrite every parameter of ``module`` (``comfy.ops`` leaves them
    uninitialised): norms 1/0, weights N(0, 1/fan_in), other 1-d parameters N(0, 0.02²), drawn in
    sorted parameter-name order from one generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    norm_params: set[str] = set()
    for mod_name, mod in module.named_modules():
        if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            norm_params.update(f"{mod_name}.{p}" if mod_name else p for p, _ in mod.named_parameters(recurse=False))
    with torch.no_grad():
        for name, param in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if name in norm_params:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
                continue
            values = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if param.dim() >= 2:
                values /= max(1, param[0].numel()) ** 0.5
            else:
                values *= 0.02
            param.copy_(values.to(param.dtype))


def build_model(kind: str, unet_config: dict[str, Any], seed: int) -> ModelPatcher:
    """A ComfyUI ``MODEL`` (CPU, fp32) of ``comfy.supported_models.<kind>`` ("SD15", "SDXL", "Flux",
    "Chroma", …) from a full ``unet_config``, initialised by :func:`init_parameters_` with ``seed``.

    The config actually used (with the model class's extra keys such as num_heads) is
    ``patcher.model.model_config.unet_config``; passing it back here rebuilds the same architecture.
    """
    import comfy.model_patcher
    import comfy.supported_models

    model_config = getattr(comfy.supported_models, kind)(copy.deepcopy(unet_config))
    model = model_config.get_model({})
    model.to(torch.float32)
    init_parameters_(model, seed)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def model_kind(patcher: ModelPatcher) -> str:
    """The ``comfy.supported_models`` class name of a model ("SD15", "SDXL", …)."""
    return type(patcher.model.model_config).__name__


def unet_weights(patcher: ModelPatcher, *, patched: bool = False) -> dict[str, torch.Tensor]:
    """The diffusion model's weights keyed as in ``BaseModel.state_dict()`` (``diffusion_model.…``),
    fp32 CPU copies.

    Uses the patcher's backups, so the result is the original weights even while ComfyUI holds the
    model loaded with patches applied; ``patched=True`` applies the patcher's patches (LoRAs etc.)
    with ``comfy.lora.calculate_weight`` instead.
    """
    import comfy.lora

    out: dict[str, torch.Tensor] = {}
    for key, entry in patcher.get_key_patches("diffusion_model.").items():
        weight, convert = entry[0]
        weight = convert(weight.detach().to("cpu", torch.float32, copy=True))
        if patched and len(entry) > 1:
            weight = comfy.lora.calculate_weight(entry[1:], weight, key)
        out[key] = weight.contiguous()
    return out


def save_tiny_model(patcher: ModelPatcher, path: Path, *, prefix: str = KEY_PREFIX, dtype: torch.dtype = torch.float32,
                    extra_meta: dict[str, str] | None = None, patched: bool = False) -> Path:
    """Write a tiny model in the format above (the one writer); returns ``path``.

    Tensors are ``prefix + <diffusion-model key>`` in ``dtype`` (the zoo ships float16; ``prefix=""``
    gives a bare diffusion-model file); ``patched`` writes the weights with the patcher's patches
    applied (:func:`unet_weights`). ``extra_meta`` adds metadata (the zoo's ``prolora.zoo.*``).
    Written atomically (temp file, then rename), parent folders created.
    """
    from prolora_core.safetensors_io import atomic_save

    tensors = {prefix + k[len("diffusion_model."):]: v.to(dtype) for k, v in unet_weights(patcher, patched=patched).items()}
    meta = {
        "prolora.model_kind": model_kind(patcher),
        "prolora.unet_config": json.dumps(patcher.model.model_config.unet_config),
        "prolora.key_prefix": prefix,
        **(extra_meta or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(tensors, path, metadata=meta)
    return path


def load_tiny_model(path: str | Path) -> ModelPatcher:
    """Rebuild a model written by :func:`save_tiny_model`: the pack's own reader
    (``nodes.tiny_model_node.load_tiny_model``, loaded with the pack under its own name), so the
    tests, the evidence and the ``Load Tiny Model`` node read files the same way. Raises the pack's
    ``ProLoRAError`` for a file without the metadata or whose weights do not fit it."""
    return pack_module("nodes.tiny_model_node").load_tiny_model(path)
