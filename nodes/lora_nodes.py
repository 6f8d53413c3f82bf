"""Load, save and apply LoRAs as ``LORA_MODEL`` objects (the pack's I/O nodes)."""
from __future__ import annotations

import os
from pathlib import Path

import comfy.sd
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..prolora_core.errors import ProLoRAError
from ..prolora_core.lora import split_module_key
from ..prolora_core.provenance import refresh_tensor_hashes
from ..prolora_core.safetensors_io import PICKLE_SUFFIXES, SafetensorsReader, atomic_save
from .bridge import LoraModel
from .transfer_nodes import CATEGORY, PREFIX, LoraModelType


def load_lora_file(path: str) -> LoraModel:
    """Any LoRA file ComfyUI reads: safetensors through the checked reader, ``.pt``/``.ckpt`` only
    through ComfyUI's weights-only loading (never a full unpickle)."""
    if path.lower().endswith(PICKLE_SUFFIXES):
        try:
            sd = comfy.utils.load_torch_file(path, safe_load=True)
        except Exception as e:
            raise ProLoRAError(f"cannot be loaded with weights-only loading ({type(e).__name__}: {str(e).splitlines()[0][:200]})", file=path) from None
        return LoraModel(sd, {}, source_file=path)
    reader = SafetensorsReader(path)
    return LoraModel({k: reader.get(k) for k in reader.keys()}, reader.header.metadata, source_file=path)


class LoadLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}LoadLoRA", display_name="Load LoRA (ProLoRA)", category=CATEGORY,
            description="Loads a LoRA file from models/loras as a LORA_MODEL, keeping its metadata (trigger words, tags).",
            inputs=[io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"), tooltip="A file in models/loras.")],
            outputs=[LoraModelType.Output(display_name="lora", tooltip="The LoRA's tensors (with its metadata attached).")],
        )

    @classmethod
    def execute(cls, lora_name: str) -> io.NodeOutput:
        path = folder_paths.get_full_path("loras", lora_name)
        if path is None:
            raise ProLoRAError("not found in models/loras", file=lora_name)
        return io.NodeOutput(load_lora_file(path))


def free_path(folder: Path, stem: str, overwrite: bool) -> Path:
    """``folder/stem.safetensors``, or with ``_00001``… appended when that exists and overwriting is off."""
    path = folder / f"{stem}.safetensors"
    n = 0
    while path.exists() and not overwrite:
        n += 1
        path = folder / f"{stem}_{n:05d}.safetensors"
    return path


class SaveLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}SaveLoRA", display_name="Save LoRA (ProLoRA)", category=CATEGORY, is_output_node=True,
            description="Saves a LORA_MODEL into models/loras (so core 'Load LoRA' lists it at once), in the input's own key format, "
                        "with its metadata and the transfer's provenance. Never overwrites silently.",
            inputs=[
                LoraModelType.Input("lora", tooltip="The LoRA to save (e.g. from Project LoRA)."),
                io.String.Input("filename", default="prolora/transferred", tooltip="Name inside models/loras, without extension; sub-folders allowed."),
                io.Combo.Input("key_format", options=["as input", "comfyui-native"], default="as input",
                               tooltip="'as input': the source file's own naming (kohya in, kohya out). 'comfyui-native': diffusion_model.… keys."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of that name (otherwise a number is appended)."),
            ],
            outputs=[io.String.Output(display_name="lora_name", tooltip="The saved file's name as core 'Load LoRA' lists it.")],
        )

    @classmethod
    def execute(cls, lora, filename: str, key_format: str, overwrite: bool) -> io.NodeOutput:
        root = Path(folder_paths.get_folder_paths("loras")[0]).resolve()
        stem = filename.strip().removesuffix(".safetensors")
        target_dir = (root / stem).parent.resolve()
        if not stem or root not in (target_dir, *target_dir.parents):
            raise ProLoRAError("filename must name a file inside models/loras", file=filename)
        target_dir.mkdir(parents=True, exist_ok=True)
        path = free_path(target_dir, Path(stem).name, overwrite)
        names = getattr(lora, "save_names", {}) if key_format == "as input" else {}
        tensors = {}
        for key, t in lora.items():
            module, suffix = split_module_key(key)
            tensors[f"{names.get(module, module)}{suffix}"] = t
        atomic_save(tensors, path, refresh_tensor_hashes(tensors, getattr(lora, "metadata", None) or {}) or None)  # hashes of these very keys
        name = os.path.relpath(path, root).replace(os.sep, "/")
        return io.NodeOutput(name, ui={"text": [f"saved models/loras/{name}"]})


class ApplyLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}ApplyLoRA", display_name="Apply LoRA (ProLoRA)", category=CATEGORY,
            description="Applies a LORA_MODEL to a MODEL and a CLIP (core 'Load LoRA Model' patches the model only).",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to patch."),
                io.Clip.Input("clip", tooltip="The text encoder to patch with the LoRA's text-encoder part."),
                LoraModelType.Input("lora", tooltip="The LoRA to apply."),
                io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01, tooltip="Strength on the diffusion model."),
                io.Float.Input("strength_clip", default=1.0, min=-100.0, max=100.0, step=0.01, tooltip="Strength on the text encoder."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="Patched model."), io.Clip.Output(display_name="clip", tooltip="Patched text encoder.")],
        )

    @classmethod
    def execute(cls, model, clip, lora, strength_model: float, strength_clip: float) -> io.NodeOutput:
        m, c = comfy.sd.load_lora_for_models(model, clip, dict(lora), strength_model, strength_clip)
        return io.NodeOutput(m, c)


NODES: list[type[io.ComfyNode]] = [LoadLoRA, SaveLoRA, ApplyLoRA]
