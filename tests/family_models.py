"""Tiny diffusion transformers of the 2025 families, built from ComfyUI's own classes
(``comfy.supported_models``) at toy width, for the family tests.

Each builder returns a ComfyUI ``MODEL`` (``ModelPatcher``) whose module names and layout are the
real model's: ComfyUI's key maps (``comfy.lora.model_lora_keys_unet``), which test the model class,
treat them as they treat the full-size checkpoints. Widths are small so an SVD of every weight takes
milliseconds; the ratios that matter for LoRA placement (fused ``qkv`` = 3 × hidden rows, Wan's
``ffn`` width, Qwen-Image's ``img_mod.1`` = 6 × hidden) are kept.

* Wan 2.1 14B-like (``WAN21_T2V``): the Wan 2.2 A14B high-noise and low-noise experts have this
  same config, so they are perturbed copies of it (:func:`wan22_experts_from`);
* Wan 2.1 1.3B-like (``WAN21_T2V``, narrower) and Wan 2.2 5B-like (``WAN22_T2V``, ``out_dim`` 48):
  the same family at other sizes, for the "shapes cannot match" message;
* Qwen-Image (``QwenImage``): Qwen-Image-Edit has the same config, a perturbed copy stands in;
* SD3 (``SD3``, MMDiT), Z-Image (``ZImage``, Lumina2's NextDiT) and HunyuanVideo (``HunyuanVideo``):
  fused ``qkv`` weights;
* FLUX.2 (``Flux2``): Klein 4B-like (hidden 64) and Klein 9B-like (hidden 96), FLUX.2's layout
  (global modulation ``double_stream_modulation_img/txt.lin``, ``single_stream_modulation.lin``, no
  per-block modulation, SwiGLU MLPs: ``img_mlp.0`` = 2 × 3 × hidden rows, single-block ``linear1`` =
  3 × hidden + 6 × hidden rows, no biases). Klein base and distilled have the same config: a
  perturbed copy stands in for the distilled model.
"""
from __future__ import annotations

from typing import Any

import torch

import comfy_host

#: Wan 2.1 14B in miniature: dim 64 (2 heads of 32), ffn 128, 2 layers, text_dim 32.
WAN14_CONFIG: dict[str, Any] = {
    "image_model": "wan2.1", "model_type": "t2v", "dim": 64, "ffn_dim": 128, "num_heads": 2, "num_layers": 2,
    "in_dim": 4, "out_dim": 4, "text_dim": 32, "freq_dim": 32, "patch_size": (1, 2, 2), "window_size": (-1, -1),
    "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6,
}
#: Wan 2.1 1.3B in miniature: the same blocks at a narrower width (dim 32, ffn 64).
WAN13_CONFIG: dict[str, Any] = {**WAN14_CONFIG, "dim": 32, "ffn_dim": 64, "num_heads": 1}
#: Wan 2.2 5B (TI2V) in miniature: ``WAN22_T2V`` (48 latent channels), dim 48.
WAN22_5B_CONFIG: dict[str, Any] = {**WAN14_CONFIG, "dim": 48, "ffn_dim": 96, "num_heads": 2, "in_dim": 48, "out_dim": 48}

#: Qwen-Image in miniature: 2 heads of 16 (hidden 32; axes_dims_rope sums to 16), 2 blocks, text 32.
QWEN_IMAGE_CONFIG: dict[str, Any] = {
    "image_model": "qwen_image", "in_channels": 16, "out_channels": 4, "num_layers": 2, "attention_head_dim": 16,
    "num_attention_heads": 2, "joint_attention_dim": 32, "axes_dims_rope": (4, 6, 6),
}

#: SD3 (MMDiT) in miniature: depth 1 → hidden 64, one head; fused ``attn.qkv`` [192, 64].
SD3_CONFIG: dict[str, Any] = {
    "in_channels": 4, "out_channels": 4, "patch_size": 2, "depth": 1, "input_size": None, "adm_in_channels": 16,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 64}},
    "num_patches": 64, "pos_embed_max_size": 8, "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [],
}

#: Z-Image (Lumina2 NextDiT with Z-Image's modulation) in miniature: dim 64, 2 heads, 1 layer.
ZIMAGE_CONFIG: dict[str, Any] = {
    "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "cap_feat_dim": 32, "n_layers": 1,
    "n_refiner_layers": 1, "qk_norm": True, "n_heads": 2, "n_kv_heads": 2, "axes_dims": [8, 12, 12], "axes_lens": [64, 32, 32],
    "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0, "multiple_of": 16, "z_image_modulation": True, "time_scale": 1000.0,
}

#: HunyuanVideo in miniature: hidden 64 (2 heads of 32), one double and one single block.
HUNYUAN_VIDEO_CONFIG: dict[str, Any] = {
    "image_model": "hunyuan_video", "in_channels": 4, "out_channels": 4, "vec_in_dim": 16, "context_in_dim": 32,
    "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [8, 12, 12],
    "theta": 256, "patch_size": [1, 2, 2], "qkv_bias": True, "guidance_embed": False, "byt5": False, "meanflow": False,
    "use_cond_type_embedding": False, "vision_in_dim": None,
}

#: FLUX.2 Klein 4B in miniature (``comfy.ldm.flux.model.Flux`` with FLUX.2's flags, as ComfyUI's
#: detection sets them): hidden 64, 2 heads of 32 (four rope axes of 8), one double and one single block.
FLUX2_KLEIN4B_CONFIG: dict[str, Any] = {
    "image_model": "flux2", "in_channels": 8, "out_channels": 8, "vec_in_dim": None, "context_in_dim": 32, "hidden_size": 64,
    "mlp_ratio": 3.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [8, 8, 8, 8], "theta": 2000, "patch_size": 1,
    "qkv_bias": False, "guidance_embed": False, "global_modulation": True, "mlp_silu_act": True, "ops_bias": False,
    "default_ref_method": "index", "ref_index_scale": 10.0,
}
#: FLUX.2 Klein 9B in miniature: the same blocks at a larger width (hidden 96, 3 heads of 32).
FLUX2_KLEIN9B_CONFIG: dict[str, Any] = {**FLUX2_KLEIN4B_CONFIG, "hidden_size": 96, "num_heads": 3}

FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "wan21_14b": ("WAN21_T2V", WAN14_CONFIG),
    "wan21_1.3b": ("WAN21_T2V", WAN13_CONFIG),
    "wan22_5b": ("WAN22_T2V", WAN22_5B_CONFIG),
    "qwen_image": ("QwenImage", QWEN_IMAGE_CONFIG),
    "sd3": ("SD3", SD3_CONFIG),
    "z_image": ("ZImage", ZIMAGE_CONFIG),
    "hunyuan_video": ("HunyuanVideo", HUNYUAN_VIDEO_CONFIG),
    "flux2_klein4b": ("Flux2", FLUX2_KLEIN4B_CONFIG),
    "flux2_klein9b": ("Flux2", FLUX2_KLEIN9B_CONFIG),
}


def tiny_model(family: str, seed: int = 0) -> Any:
    """A tiny model of ``family`` (a key of :data:`FAMILIES`) as a ComfyUI ``MODEL``, fp32 on the CPU,
    every parameter set deterministically from ``seed``, and every floating-point buffer of the
    diffusion model too (SD3's ``pos_embed`` is allocated uninitialised and would otherwise hold
    whatever memory held, NaN included)."""
    kind, config = FAMILIES[family]
    model = comfy_host.build_model(kind, config, seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for _, buf in sorted(model.model.diffusion_model.named_buffers(), key=lambda kv: kv[0]):
            if torch.is_floating_point(buf):
                buf.copy_(0.02 * torch.randn(buf.shape, generator=gen))
    return model


def descendant(model: Any, eps: float, seed: int) -> Any:
    """A fine-tuned-like descendant: ``comfy_host.perturbed_copy`` (every parameter + ``eps`` × mean |p|
    × seeded noise), with the source's buffers copied over (they are not trained)."""
    out = comfy_host.perturbed_copy(model, eps, seed)
    with torch.no_grad():
        for (_, b_src), (_, b_out) in zip(model.model.diffusion_model.named_buffers(), out.model.diffusion_model.named_buffers()):
            b_out.copy_(b_src)
    return out


def wan22_experts_from(wan21: Any, eps: float = 0.05) -> tuple[Any, Any]:
    """Wan 2.2 A14B's two experts in miniature: each has Wan 2.1 14B's config, and here each is the
    Wan 2.1 model plus its own seeded perturbation (high-noise seed 21, low-noise seed 22)."""
    return descendant(wan21, eps, seed=21), descendant(wan21, eps, seed=22)


def parameter_count(model: Any) -> int:
    return sum(p.numel() for p in model.model.diffusion_model.parameters())


def weight(model: Any, key: str) -> torch.Tensor:
    """One diffusion-model weight (``diffusion_model.…``) of a ``MODEL``, float32."""
    return model.model.state_dict()[key].detach().float()
