"""Tiny SD1.5-shaped UNets as real ComfyUI MODELs for the zoo, and the diffusion loss.

Building, saving and loading are ``prolora_dev.tiny_models`` (one initialiser, one writer, and the
pack's ``Load Tiny Model`` reader), shared with the tests: zoo files carry ``prolora.model_kind``,
``prolora.unet_config`` and ``prolora.key_prefix`` metadata, which the pack's ``Demo Models`` node
reads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from prolora_dev import tiny_models
from prolora_dev.tiny_models import KEY_PREFIX, SD15_UNET_CONFIG, init_parameters_, load_tiny_model

from . import configure_host

configure_host()


def build_model(unet_config: dict[str, Any] = SD15_UNET_CONFIG, seed: int = 0, kind: str = "SD15"):
    """A ComfyUI ``ModelPatcher`` (CPU, fp32) of ``kind`` (the zoo's SD1.5 layout by default) with
    deterministically initialised weights (``prolora_dev.tiny_models.build_model``)."""
    return tiny_models.build_model(kind, unet_config, seed)


def unet_state(patcher) -> dict[str, torch.Tensor]:
    """``diffusion_model`` weights (bare UNet keys), fp32 copies."""
    return {k: v.detach().float().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}


def save_zoo_model(patcher, path: Path, extra_meta: dict[str, str] | None = None, dtype=torch.float16) -> Path:
    """A zoo file: the tiny-model format (``prolora_dev.tiny_models.save_tiny_model``) in float16 with
    the zoo's ``prolora.zoo.*`` metadata."""
    return tiny_models.save_tiny_model(patcher, path, dtype=dtype, extra_meta=extra_meta)


def load_zoo_model(path: Path):
    """A MODEL from a zoo file, read by the pack's own loader (``prolora_dev.tiny_models.load_tiny_model``)."""
    return load_tiny_model(path)


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
