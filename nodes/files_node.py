"""Transfer LoRA (files): stream source and target weights from disk, write transferred LoRAs into
models/loras. Neither model is loaded for sampling; ComfyUI's own key maps name the modules."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import comfy.lora
import comfy.model_detection
import comfy.supported_models
import folder_paths
import torch
from comfy_api.latest import io

from ..prolora_core.cache import BasisCache
from ..prolora_core.errors import ProLoRAError
from ..prolora_core.lora import read_lora
from ..prolora_core.projection import MODES
from ..prolora_core.provenance import output_metadata
from ..prolora_core.safetensors_io import atomic_save
from ..prolora_core.transfer import DEFAULT_MODE, DEFAULT_THRESHOLD, PAIRINGS, Planned, TransferConfig, transfer
from ..prolora_core.weights import SafetensorsWeights, open_weights
from .bridge import cache_dir, check_interrupt, engine_device, progress
from .lora_nodes import free_path
from .transfer_nodes import CATEGORY, PREFIX

MODEL_FOLDERS = ("checkpoints", "diffusion_models")


def model_files() -> list[str]:
    """``folder/name`` entries of every safetensors file in checkpoints and diffusion_models, and of
    every GGUF file in diffusion_models (where ComfyUI-GGUF's loader looks)."""
    found = [f"{folder}/{name}" for folder in MODEL_FOLDERS for name in folder_paths.get_filename_list(folder) if name.endswith(".safetensors")]
    gguf = {name for base in folder_paths.get_folder_paths("diffusion_models")
            for name in folder_paths.filter_files_extensions(folder_paths.recursive_search(base)[0], {".gguf"})}
    return found + [f"diffusion_models/{name}" for name in sorted(gguf)]


def resolve_model_file(entry: str) -> Path:
    folder, _, name = entry.partition("/")
    path = folder_paths.get_full_path(folder, name) if folder in MODEL_FOLDERS else None
    if path is None:
        raise ProLoRAError("not found in models/checkpoints or models/diffusion_models", file=entry)
    return Path(path)


class _KeysOnly:
    """Just enough of a BaseModel for ``comfy.lora.model_lora_keys_unet``: its key names and config."""

    def __init__(self, keys: list[str], model_config: Any) -> None:
        self._keys = dict.fromkeys(keys)
        self.model_config = model_config

    def state_dict(self) -> dict[str, None]:
        return self._keys


def file_key_map(weights: SafetensorsWeights) -> dict[str, str]:
    """LoRA module name → weight key in the file, through ComfyUI's own ``model_lora_keys_unet``.

    The model type comes from ComfyUI's detection on the file's shapes (meta tensors, nothing is
    loaded), or from a ``prolora.unet_config`` in the metadata (the pack's tiny models)."""
    meta_sd = {k: torch.empty(weights.shape(k), device="meta") for k in weights.keys()}
    prefix = comfy.model_detection.unet_prefix_from_state_dict(meta_sd)
    prefix = prefix if any(k.startswith(prefix) for k in meta_sd) else ""  # a diffusion model alone (ComfyUI's loader does the same)
    meta = weights.metadata
    if "prolora.unet_config" in meta:
        prefix = meta.get("prolora.key_prefix", prefix)
        kind = getattr(comfy.supported_models, meta.get("prolora.model_kind", "SD15"))
        config = kind(json.loads(meta["prolora.unet_config"]))
    else:
        try:
            config = comfy.model_detection.model_config_from_unet(meta_sd, prefix)
        except Exception as e:  # detection reads shapes of keys a foreign file may lack
            raise ProLoRAError(f"ComfyUI cannot detect the model type ({type(e).__name__}: {e})", file=weights.path) from None
        if config is None:
            raise ProLoRAError("ComfyUI cannot detect the model type of this file", file=weights.path)
    unet_keys = ["diffusion_model." + k[len(prefix):] for k in weights.keys() if k.startswith(prefix)]
    key_map = comfy.lora.model_lora_keys_unet(_KeysOnly(unet_keys, config), {})
    return {name: prefix + key[len("diffusion_model."):] for name, key in key_map.items()}


class TransferLoRAFiles(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        files = model_files()
        loras = folder_paths.get_filename_list("loras")
        return io.Schema(
            node_id=f"{PREFIX}TransferLoRAFiles", display_name="Transfer LoRA (files) (ProLoRA)", category=CATEGORY, is_output_node=True,
            description="One node for the whole transfer: reads the source and target checkpoints from disk module by module "
                        "(no model is loaded for sampling) and writes the transferred LoRA(s) into models/loras.",
            inputs=[
                io.Combo.Input("source_model", options=files, tooltip="Checkpoint or diffusion model the LoRA was trained on."),
                io.Combo.Input("target_model", options=files, tooltip="Checkpoint or diffusion model to move the LoRA to."),
                io.Combo.Input("lora_name", options=loras, tooltip="The LoRA to transfer (models/loras)."),
                io.String.Input("more_loras", default="", multiline=True, tooltip="Further LoRA file names in models/loras, one per line: "
                                "all share one pass over the bases."),
                io.Combo.Input("mode", options=list(MODES), default=DEFAULT_MODE, tooltip="Projection mode (see Project LoRA)."),
                io.Int.Input("subspace_rank", default=0, min=0, max=4096, tooltip="k; 0 = auto min(64, min(m, n)/4)."),
                io.Float.Input("threshold", default=DEFAULT_THRESHOLD, min=0.0, max=1.0, step=0.01, tooltip="Minimum Φ_U and Φ_V to transfer a module."),
                io.Combo.Input("pairing", options=list(PAIRINGS), default="name", tooltip="name, or similarity for pruned/renumbered targets."),
                io.String.Input("suffix", default="_prolora", tooltip="Appended to each LoRA's file name for the output."),
                io.Combo.Input("device", options=["auto", "cpu", "cuda"], default="auto", tooltip="Where SVDs run."),
            ],
            outputs=[
                io.String.Output(display_name="lora_names", tooltip="Saved file names (one per line), as core 'Load LoRA' lists them."),
                io.String.Output(display_name="report", tooltip="What was transferred and skipped."),
            ],
        )

    @classmethod
    def execute(cls, source_model: str, target_model: str, lora_name: str, more_loras: str, mode: str, subspace_rank: int,
                threshold: float, pairing: str, suffix: str, device: str) -> io.NodeOutput:
        names = [lora_name] + [n.strip() for n in more_loras.splitlines() if n.strip()]
        paths = []
        for n in names:
            p = folder_paths.get_full_path("loras", n)
            if p is None:
                raise ProLoRAError("not found in models/loras", file=n)
            paths.append(Path(p))
        config = TransferConfig(mode=mode, subspace_rank=subspace_rank or None, threshold=threshold, pairing=pairing, device=engine_device(device))
        cache = BasisCache(cache_dir(), config.basis)
        source = open_weights(resolve_model_file(source_model), cache.memo_dir)
        target = open_weights(resolve_model_file(target_model), cache.memo_dir)
        key_map = file_key_map(source)
        loras = [read_lora(p) for p in paths]
        plan = [Planned(i, mod, key_map.get(mod.name)) for i, lora in enumerate(loras) for mod in lora.modules.values()]
        for i, lora in enumerate(loras):
            if all(p.source_key is None for p in plan if p.lora_index == i):
                raise ProLoRAError(f"none of the LoRA's modules maps onto {source.label}: is it a LoRA for another base model?", file=lora.path)
        results, stats = transfer(loras, plan, source, target, config, cache, progress(len(plan)), check_interrupt)
        source.save_memo()
        target.save_memo()
        root = Path(folder_paths.get_folder_paths("loras")[0])
        saved, lines = [], [f"ProLoRA {mode}: {source.label} → {target.label}; bases computed {stats.svd_computed}, from cache {stats.bases_from_cache}"]
        for result, path in zip(results, paths):
            s = result.summary()
            lines.append(f"{path.name}: {s['transferred']}/{s['modules']} transferred, {s['below_threshold']} below threshold, "
                         f"{s['no_base_weight']} unmapped (text-encoder parts are not read from files yet), norm ratio {s['norm_ratio']}")
            if s["transferred"] == 0:
                continue
            out = free_path(root, path.stem + suffix, overwrite=False)
            atomic_save(result.tensors, out, output_metadata(result, source.label, target.label, config))
            saved.append(out.name)
        if not saved:
            raise ProLoRAError("no module could be transferred:\n" + "\n".join(lines))
        return io.NodeOutput("\n".join(saved), "\n".join(lines), ui={"text": lines})



