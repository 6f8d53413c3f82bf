"""Helpers for tests that run against the REAL ComfyUI host in ``.comfyui/``.

Nothing here fakes ComfyUI: models are real ``comfy.model_patcher.ModelPatcher``
objects, the CLIP is a real ``comfy.sd.CLIP`` and the server is ComfyUI's own
``main.py`` in a subprocess.

What the tests share with the evidence study and the scripts lives in ``prolora_dev``
(host set-up, the pack import, tiny models and their file format, the server harness)
and is re-exported here under the names the tests use; this module adds what only
tests need (random LoRAs, perturbed descendants, a tiny CLIP, one sampling step) and
turns a missing host into a test failure (never a skip) with the set-up hint.

It imports no ComfyUI code at import time, so test files may ``from comfy_host import
...`` even where the host is missing. ``tests/conftest.py`` has configured the host
(``prolora_dev.host.configure_host``) before any test module is imported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

from prolora_dev import host, server
from prolora_dev.host import COMFYUI_DIR, PACK_DIR_NAME, REPO_ROOT, SETUP_HINT, comfy_module_name, load_pack
from prolora_dev.server import (
    MODEL_SUBDIRS,
    ComfyServer,
    PromptFailed,
    PromptRejected,
    find_pack_import_line,
    free_loopback_port,
    pack_import_errors,
    prepare_base_dir,
)
from prolora_dev.tiny_models import (
    CHROMA_UNET_CONFIG,
    FLUX_UNET_CONFIG,
    SD15_UNET_CONFIG,
    SDXL_ADM_IN_CHANNELS,
    SDXL_POOLED_DIM,
    SDXL_UNET_CONFIG,
    init_parameters_,
    model_kind,
    unet_weights,
)
from prolora_dev.tiny_models import load_tiny_model as load_model_state
from prolora_dev.tiny_models import save_tiny_model as save_model_state

if TYPE_CHECKING:
    from comfy.model_patcher import ModelPatcher
    from comfy.sd import CLIP

# --------------------------------------------------------------------------------------
# Host presence
# --------------------------------------------------------------------------------------


def require_host_files() -> None:
    """Fail the current test (never skip) when the ComfyUI host is not set up."""
    if not host.host_files_present():
        pytest.fail(SETUP_HINT, pytrace=False)


def require_comfyui() -> None:
    """Fail the current test (never skip) when the ComfyUI host is missing or mis-wired for in-process use."""
    require_host_files()
    spec = importlib.util.find_spec("comfy")  # a namespace package: no __init__.py, no origin
    locations = [Path(p).resolve() for p in (spec.submodule_search_locations or [])] if spec else []
    if (COMFYUI_DIR / "comfy").resolve() not in locations[:1]:
        pytest.fail(f"`comfy` does not resolve to {COMFYUI_DIR}/comfy: was tests/conftest.py loaded?", pytrace=False)


def start_comfy_server(base_dir: Path, *, startup_timeout: float = 90.0, extra_args: tuple[str, ...] = ()) -> ComfyServer:
    """:func:`prolora_dev.server.start_comfy_server`, failing the test (with the log tail) when the
    server does not come up."""
    require_host_files()
    try:
        return server.start_comfy_server(base_dir, startup_timeout=startup_timeout, extra_args=extra_args)
    except server.ServerStartError as exc:
        pytest.fail(str(exc), pytrace=False)


# --------------------------------------------------------------------------------------
# Tiny models as real ComfyUI MODELs (architectures and file format: prolora_dev.tiny_models)
# --------------------------------------------------------------------------------------


def build_model(kind: str, unet_config: dict[str, Any], seed: int) -> ModelPatcher:
    """:func:`prolora_dev.tiny_models.build_model`, after checking the host is wired for in-process
    use and in CPU mode."""
    require_comfyui()
    import comfy.model_management

    from prolora_dev.tiny_models import build_model as dev_build

    assert comfy.model_management.get_torch_device() == torch.device("cpu"), "ComfyUI is not in CPU mode (args.cpu not set early enough?)"
    return dev_build(kind, unet_config, seed)


def tiny_sd15_model(seed: int = 0) -> ModelPatcher:
    """A tiny SD1.5-shaped UNet (~1.1 M parameters) as a ComfyUI ``MODEL``."""
    return build_model("SD15", SD15_UNET_CONFIG, seed)


def tiny_sdxl_model(seed: int = 0) -> ModelPatcher:
    """A tiny SDXL-shaped UNet (ADM/label_emb included) as a ComfyUI ``MODEL``."""
    return build_model("SDXL", SDXL_UNET_CONFIG, seed)

def tiny_flux_model(seed: int = 0) -> ModelPatcher:
    """A tiny Flux.1-shaped transformer (ComfyUI's own ``supported_models.Flux``) as a ``MODEL``."""
    return build_model("Flux", FLUX_UNET_CONFIG, seed)


def tiny_chroma_from(flux: ModelPatcher, eps: float, seed: int) -> ModelPatcher:
    """A Chroma-like descendant of a tiny Flux (ComfyUI's own ``supported_models.Chroma``): every
    weight the two share by name and shape is the Flux one plus ``eps`` x (mean |p|) x noise, as in
    :func:`perturbed_copy`; Chroma's own weights (the approximator) keep their seeded init."""
    target = build_model("Chroma", CHROMA_UNET_CONFIG, seed=1)
    src = flux.model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in target.model.state_dict().items():
            if key in src and src[key].shape == p.shape and key.startswith("diffusion_model."):
                p.copy_(src[key] + eps * src[key].abs().mean() * torch.randn(p.shape, generator=gen))
    return target


def perturbed_copy(patcher: ModelPatcher, eps: float, seed: int) -> ModelPatcher:
    """A "fine-tuned" descendant: a new model of the same architecture whose every parameter is the
    source's plus ``eps`` × (mean |p|) × Gaussian noise (seeded)."""
    target = build_model(model_kind(patcher), patcher.model.model_config.unet_config, seed=0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p_src, p_tgt in zip(patcher.model.parameters(), target.model.parameters()):
            p_tgt.copy_(p_src + eps * p_src.abs().mean() * torch.randn(p_src.shape, generator=gen))
    return target


def kohya_lora(patcher: ModelPatcher, modules: list[str], *, rank: int = 4, alpha: float | None = 4.0, scale: float = 0.1,
               seed: int = 1) -> dict[str, torch.Tensor]:
    """A random kohya LoRA (``lora_unet_<module with underscores>``) on ``modules`` of the UNet:
    linear factors for linear weights, LoCon factors (down ``[r, in, kh, kw]``, up ``[out, r, 1, 1]``)
    for conv weights; entries ~ N(0, scale²); ``alpha=None`` writes no alpha."""
    sd = patcher.model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for mod in modules:
        w = sd[f"diffusion_model.{mod}.weight"]
        name = "lora_unet_" + mod.replace(".", "_")
        out[f"{name}.lora_down.weight"] = scale * torch.randn((rank, *w.shape[1:]), generator=gen)
        out[f"{name}.lora_up.weight"] = scale * torch.randn((w.shape[0], rank, *([1, 1] if w.ndim == 4 else [])), generator=gen)
        if alpha is not None:
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out

def factor_lora(shapes: dict[str, tuple[int, int]], *, peft: bool, rank: int, alpha: float, scale: float = 0.1,
                seed: int = 1) -> dict[str, torch.Tensor]:
    """Random linear factors, entries ~ N(0, scale²), on each module name of ``shapes`` (its ``m × n``,
    in order): PEFT ``lora_A``/``lora_B`` without alpha, or kohya ``lora_down``/``lora_up`` + ``alpha``."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, (m, n) in shapes.items():
        down, up = scale * torch.randn(rank, n, generator=gen), scale * torch.randn(m, rank, generator=gen)
        if peft:
            out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = down, up
        else:
            out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
            out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def assert_same_change(before: dict[str, torch.Tensor], want: dict[str, torch.Tensor], got: dict[str, torch.Tensor], rel: float = 1e-5) -> None:
    """Every weight changed by ``got − before`` as by ``want − before``, within ``rel`` of the change's norm."""
    for k in before:
        d_want, d_got = (want[k] - before[k]).double(), (got[k] - before[k]).double()
        assert float((d_got - d_want).norm()) <= rel * max(float(d_want.norm()), 1e-12), k


def tiny_conditioning(patcher: ModelPatcher, seed: int = 0, tokens: int = 77) -> list[list[Any]]:
    """A ``CONDITIONING`` matching the model: ``[[cond, {...}]]``; SDXL also gets ``pooled_output``."""
    unet_config = patcher.model.model_config.unet_config
    gen = torch.Generator().manual_seed(seed)
    cond = torch.randn((1, tokens, unet_config["context_dim"]), generator=gen)
    extra: dict[str, Any] = {}
    adm = unet_config.get("adm_in_channels")
    if adm:
        extra["pooled_output"] = torch.randn((1, adm - 6 * 256), generator=gen)
    return [[cond, extra]]


def sample_step(patcher: ModelPatcher, positive: list[list[Any]], negative: list[list[Any]], *, seed: int = 0,
                steps: int = 1, cfg: float = 2.0, size: tuple[int, int] = (8, 8)) -> torch.Tensor:
    """Run ComfyUI's own KSampler path (``nodes.common_ksampler``) on an empty latent; returns the samples."""
    require_comfyui()
    import nodes

    latent = {"samples": torch.zeros((1, 4, size[0], size[1]))}
    (out,) = nodes.common_ksampler(patcher, seed, steps, cfg, "euler", "normal", positive, negative, latent)
    return out["samples"]


def save_tiny_pair(models_dir: Path, target_seed: int, eps: float = 0.05) -> ModelPatcher:
    """Write a tiny SD1.5 source (seed 0) and a :func:`perturbed_copy` of it as
    ``models_dir/diffusion_models/tiny_src|tiny_tgt.safetensors``; returns the source."""
    src = tiny_sd15_model(0)
    save_model_state(src, models_dir / "diffusion_models" / "tiny_src.safetensors")
    save_model_state(perturbed_copy(src, eps, seed=target_seed), models_dir / "diffusion_models" / "tiny_tgt.safetensors")
    return src


# --------------------------------------------------------------------------------------
# Tiny CLIP (SD1.5 clip_l layout)
# --------------------------------------------------------------------------------------

#: Overrides of ComfyUI's sd1_clip_config.json: 2 layers of width 32 (vocab stays 49408 for the real tokenizer).
TINY_CLIP_CONFIG: dict[str, Any] = {
    "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2, "projection_dim": 32,
}


def tiny_clip(seed: int = 0) -> CLIP:
    """A tiny SD1.5-style text encoder as a real ComfyUI ``CLIP`` (fp32, CPU).

    Real ``SD1Tokenizer`` + ``SD1ClipModel`` with a shrunken ``clip_l`` config; its
    hidden size (32) equals the tiny SD1.5 UNet's ``context_dim``, so CLIPTextEncode
    output feeds ``tiny_sd15_model`` directly.
    """
    require_comfyui()
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    cpu = torch.device("cpu")
    clip = comfy.sd.CLIP(target, embedding_directory=None, model_options={
        "clip_l_model_config": dict(TINY_CLIP_CONFIG), "dtype": torch.float32,  # CPU default would be fp16
        "load_device": cpu, "offload_device": cpu, "initial_device": cpu,
    })
    init_parameters_(clip.cond_stage_model, seed)
    return clip


def run_node(nodes_by_id: dict[str, Any], node_id: str, **kwargs: Any) -> tuple:
    """Run one of the pack's V3 nodes in-process; its outputs as a tuple."""
    return tuple(nodes_by_id[node_id].execute(**kwargs).args)


def applied_by_comfyui(model: ModelPatcher, lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's weights after ComfyUI's own LoRA loader (core "Load LoRA Model") applied ``lora``."""
    from comfy_extras.nodes_train import LoraModelLoader

    (patched,) = LoraModelLoader.execute(model=model, lora=lora, strength_model=1.0).args
    return unet_weights(patched, patched=True)


def lora_delta(lora: dict[str, torch.Tensor], name: str, kohya_scale: float) -> Any:
    """A module's ΔW in float64 numpy: PEFT ``lora_A``/``lora_B`` at scale 1 (no alpha), else kohya
    ``lora_down``/``lora_up`` at ``kohya_scale`` (alpha / rank)."""
    if f"{name}.lora_A.weight" in lora:
        down, up, scale = lora[f"{name}.lora_A.weight"], lora[f"{name}.lora_B.weight"], 1.0
    else:
        down, up, scale = lora[f"{name}.lora_down.weight"], lora[f"{name}.lora_up.weight"], kohya_scale
    return scale * (up.double().numpy() @ down.double().numpy())


def node_basis(nodes_by_id: dict[str, Any], model: Any, cache: bool = False) -> Any:
    """Compute Basis (ProLoRA) on ``model`` at the default k, on the CPU."""
    (handle,) = run_node(nodes_by_id, "ProLoRAComputeBasis", model=model, subspace_rank=0, device="cpu", use_cache=cache)
    return handle


def node_project(nodes_by_id: dict[str, Any], bs: Any, bt: Any, lora: dict, mode: str) -> tuple[dict, str, str]:
    """Match Modules (threshold 0, name pairing) then Project LoRA in ``mode``: (LoRA, match summary, report)."""
    match, summary = run_node(nodes_by_id, "ProLoRAMatchModules", source_basis=bs, target_basis=bt, lora=lora, threshold=0.0, pairing="name")
    out, report = run_node(nodes_by_id, "ProLoRAProjectLoRA", lora=lora, match=match, mode=mode, out_rank=0, rescale_to_source_norm=False)
    return out, summary, report


def node_transfer(nodes_by_id: dict[str, Any], src: Any, tgt: Any, lora: dict, mode: str) -> tuple[dict, str, str]:
    """The three nodes from two models to the projected LoRA (:func:`node_project`)."""
    return node_project(nodes_by_id, node_basis(nodes_by_id, src), node_basis(nodes_by_id, tgt), lora, mode)


def default_k(m: int, n: int) -> int:
    """The engine's default subspace rank for an ``m × n`` weight."""
    return min(64, min(m, n) // 4)
