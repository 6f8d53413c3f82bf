"""Load the pack's tiny models (config in the safetensors metadata) as ordinary ComfyUI MODELs.

ComfyUI's UNETLoader detects architectures from real SD/SDXL sizes and cannot place a model a
few MB large; these files carry their full ``unet_config`` instead."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import comfy.model_management
import torch
import xxhash
import comfy.model_patcher
import comfy.supported_models
import folder_paths
from comfy_api.latest import io

from ..prolora_core.errors import ProLoRAError
from ..prolora_core.safetensors_io import SafetensorsReader
from .transfer_nodes import CATEGORY, PREFIX

KINDS = {"SD15": comfy.supported_models.SD15, "SDXL": comfy.supported_models.SDXL, "Flux": comfy.supported_models.Flux,
         "Chroma": comfy.supported_models.Chroma}


def load_tiny_model(path: str | Path) -> Any:
    """A ``MODEL`` (ModelPatcher) built from ``prolora.model_kind`` + ``prolora.unet_config`` metadata."""
    reader = SafetensorsReader(path)
    meta = reader.header.metadata
    if "prolora.unet_config" not in meta:
        raise ProLoRAError("has no prolora.unet_config metadata: not a ProLoRA tiny model (use ComfyUI's own loaders for real checkpoints)", file=path)
    kind = meta.get("prolora.model_kind", "SD15")
    if kind not in KINDS:
        raise ProLoRAError(f"unknown prolora.model_kind '{kind}'", file=path)
    prefix = meta.get("prolora.key_prefix", "model.diffusion_model.")
    config = KINDS[kind](json.loads(meta["prolora.unet_config"]))
    model = config.get_model({})
    state = {"diffusion_model." + k[len(prefix):]: reader.get(k).float() for k in reader.keys() if k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.startswith("diffusion_model.")]
    if missing or unexpected:
        raise ProLoRAError(f"weights do not fit the stored config: missing {missing[:3]}, unexpected {unexpected[:3]}", file=path)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


class TinyModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}TinyModelLoader", display_name="Load Tiny Model (ProLoRA)", category=CATEGORY,
            description="Loads a tiny test/demo UNet from models/diffusion_models whose config is stored in its metadata.",
            inputs=[io.Combo.Input("model_name", options=folder_paths.get_filename_list("diffusion_models"),
                                   tooltip="A .safetensors file in models/diffusion_models written by the pack's zoo or tests.")],
            outputs=[io.Model.Output(display_name="model", tooltip="The tiny model as an ordinary MODEL.")],
        )

    @classmethod
    def execute(cls, model_name: str) -> io.NodeOutput:
        path = folder_paths.get_full_path("diffusion_models", model_name)
        if path is None:
            raise ProLoRAError("not found in models/diffusion_models", file=model_name)
        return io.NodeOutput(load_tiny_model(path))


def tiny_conditioning(model: Any, text: str, tokens: int = 77) -> list[list[Any]]:
    """A fixed ``CONDITIONING`` for a tiny model: a seeded random embedding per text (the tiny
    models are conditioned on such embeddings instead of a text encoder); SDXL also gets
    ``pooled_output``."""
    cfg = model.model.model_config.unet_config
    gen = torch.Generator().manual_seed(int(xxhash.xxh64_intdigest(text.encode())) & 0x7FFFFFFF)
    cond = torch.randn((1, tokens, cfg["context_dim"]), generator=gen)
    extra: dict[str, Any] = {}
    if cfg.get("adm_in_channels"):
        extra["pooled_output"] = torch.randn((1, cfg["adm_in_channels"] - 6 * 256), generator=gen)
    return [[cond, extra]]


class TinyConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}TinyConditioning", display_name="Tiny Conditioning (ProLoRA)", category=CATEGORY,
            description="Conditioning for the pack's tiny models (they have no text encoder): a fixed embedding per text.",
            inputs=[io.Model.Input("model", tooltip="The tiny model (its context width is read from it)."),
                    io.String.Input("text", default="", tooltip="Any text; the same text always gives the same embedding.")],
            outputs=[io.Conditioning.Output(display_name="conditioning", tooltip="CONDITIONING for KSampler.")],
        )

    @classmethod
    def execute(cls, model, text: str) -> io.NodeOutput:
        return io.NodeOutput(tiny_conditioning(model, text))


NODES: list[type[io.ComfyNode]] = [TinyModelLoader, TinyConditioning]
