"""Tiny SD1.5-shaped UNets as real ComfyUI MODELs, their zoo files, and the diffusion loss.

``init_parameters_`` here is the one initialiser (``tests/comfy_host.py`` calls it), so the zoo's
rebuild does not depend on the test harness. Zoo files use the metadata scheme that the pack's
``Load Tiny Model`` / ``Demo Models`` nodes read (``prolora.model_kind``, ``prolora.unet_config``,
``prolora.key_prefix``).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from . import configure_host

configure_host()

#: SD1.5 layout in miniature (= tests/comfy_host.SD15_UNET_CONFIG): attention at both levels, conv
#: proj_in/proj_out, context_dim 32. ``supported_models.SD15`` adds num_heads=8, num_head_channels=-1.
SD15_UNET_CONFIG: dict[str, Any] = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
    "use_temporal_resblock": False, "use_temporal_attention": False,
    "adm_in_channels": None, "context_dim": 32, "use_linear_in_transformer": False,
    "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1,
}
KEY_PREFIX = "model.diffusion_model."


def init_parameters_(module: torch.nn.Module, seed: int) -> None:
    """Deterministic init (norms 1/0, weights N(0, 1/fan_in), other 1-d params N(0, 0.02²))."""
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


def build_model(unet_config: dict[str, Any] = SD15_UNET_CONFIG, seed: int = 0, kind: str = "SD15"):
    """A ComfyUI ``ModelPatcher`` (CPU, fp32) of ``kind`` with deterministically initialised weights."""
    import comfy.model_patcher
    import comfy.supported_models

    model_config = getattr(comfy.supported_models, kind)(copy.deepcopy(unet_config))
    model = model_config.get_model({})
    model.to(torch.float32)
    init_parameters_(model, seed)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def unet_state(patcher) -> dict[str, torch.Tensor]:
    """``diffusion_model`` weights (bare UNet keys), fp32 copies."""
    return {k: v.detach().float().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}


def save_zoo_model(patcher, path: Path, extra_meta: dict[str, str] | None = None, dtype=torch.float16) -> Path:
    """Safetensors in checkpoint layout (``model.diffusion_model.<key>``), metadata as in comfy_host."""
    import safetensors.torch

    tensors = {KEY_PREFIX + k: v.to(dtype).contiguous() for k, v in unet_state(patcher).items()}
    meta = {
        "prolora.model_kind": type(patcher.model.model_config).__name__,
        "prolora.unet_config": json.dumps(patcher.model.model_config.unet_config),
        "prolora.key_prefix": KEY_PREFIX,
        **(extra_meta or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(path), metadata=meta)
    return path


def load_zoo_model(path: Path):
    """Rebuild a MODEL written by :func:`save_zoo_model` (or comfy_host.save_model_state)."""
    import safetensors

    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        prefix = meta["prolora.key_prefix"]
        state = {k[len(prefix):]: f.get_tensor(k).float() for k in f.keys()}
    patcher = build_model(json.loads(meta["prolora.unet_config"]), seed=0, kind=meta["prolora.model_kind"])
    missing, unexpected = patcher.model.diffusion_model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return patcher


def eps_prediction(model, params: dict[str, torch.Tensor] | None, x_t: torch.Tensor, sigma: torch.Tensor,
                   context: torch.Tensor) -> torch.Tensor:
    """ε̂ through ComfyUI's ``BaseModel.apply_model`` (k-diffusion parametrisation: x_t = x0 + σ·ε).

    ``params`` (bare UNet names → tensors) replace the diffusion model's parameters for this call
    (``torch.func.functional_call``), which is how LoRA deltas and training enter.
    """
    if params is None:
        denoised = model.apply_model(x_t, sigma, c_crossattn=context)
    else:
        # What torch.func.functional_call does, around ComfyUI's apply_model instead of a forward().
        from torch.nn.utils.stateless import _reparametrize_module

        with _reparametrize_module(model.diffusion_model, params, strict=False):
            denoised = model.apply_model(x_t, sigma, c_crossattn=context)
    return (x_t - denoised) / sigma.view(-1, 1, 1, 1)


def sample_training_sigmas(model, n: int, gen: torch.Generator) -> torch.Tensor:
    """σ of uniformly drawn discrete timesteps of the model's own schedule (as SD training does)."""
    ms = model.model_sampling
    t = torch.randint(0, ms.sigmas.shape[0], (n,), generator=gen)
    return ms.sigmas[t].float()


def diffusion_loss(model, params, x0, context, noise, sigma) -> torch.Tensor:
    """ε-prediction MSE at x_t = x0 + σ·ε (per-sample mean)."""
    x_t = x0 + sigma.view(-1, 1, 1, 1) * noise
    eps = eps_prediction(model, params, x_t, sigma, context)
    return (eps - noise).square().mean(dim=(1, 2, 3))
