"""Transfer LoRA (files): stream source and target weights from disk, write each transferred LoRA
next to its input in models/loras, named after the target. Neither model is loaded for sampling;
ComfyUI's own key maps name the modules."""
from __future__ import annotations

import json
from pathlib import Path

import comfy.lora
import comfy.model_detection
import comfy.supported_models
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..prolora_core.cache import DEFAULT_MAX_GB, BasisCache
from ..prolora_core.config import default_threads
from ..prolora_core.errors import ProLoRAError
from ..prolora_core.lora import read_lora
from ..prolora_core.outputs import DEFAULT_PATTERN, free_path, output_stem
from ..prolora_core.projection import MODES
from ..prolora_core.provenance import output_metadata
from ..prolora_core.report import format_summary
from ..prolora_core.safetensors_io import atomic_save
from ..prolora_core.slices import parse_place, place_key
from ..prolora_core.transfer import DEFAULT_MODE, DEFAULT_THRESHOLD, PAIRINGS, Planned, TransferConfig, transfer
from ..prolora_core.gguf_weights import GGUFWeights
from ..prolora_core.weights import SafetensorsWeights, open_weights
from .bridge import cache_dir, check_interrupt, engine_device, progress
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


def file_key_map(weights: SafetensorsWeights | GGUFWeights) -> dict[str, str]:
    """LoRA module name → weight key in the file, or the virtual key of a slice of one
    (``prolora_core.slices``), through ComfyUI's own ``model_lora_keys_unet``.

    The model type comes from ComfyUI's detection on the file's shapes (meta tensors, nothing is
    loaded), or from a ``prolora.unet_config`` in the metadata (the pack's tiny models). The map is
    built on a real model object of that class on the meta device (no weight memory), so every
    family branch of ``model_lora_keys_unet`` applies (Flux's q/k/v slices of the fused ``qkv``,
    SD3, …). Entries whose weight the file lacks, and targets the engine cannot serve (a function
    other than ``swap_scale_shift`` applied to the update), are left out: their modules are reported
    unmapped."""
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
    model = config.get_model({}, "", device=torch.device("meta"))
    file_keys = set(weights.keys())
    out: dict[str, str] = {}
    for name, target in comfy.lora.model_lora_keys_unet(model, {}).items():
        place = place_key(target, comfy.utils.swap_scale_shift)
        piece = parse_place(place) if place is not None else None
        whole = piece.key if piece is not None else place
        if whole is None or not whole.startswith("diffusion_model."):
            continue
        key = prefix + whole[len("diffusion_model."):]
        if key in file_keys:
            out[name] = piece.on(key).virtual_key if piece is not None else key
    return out


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
                io.String.Input("filename_pattern", default=DEFAULT_PATTERN, tooltip="Output file name, saved in the input LoRA's own folder: "
                                "{lora} {target} {source} {mode} are replaced by the names; an existing file is never overwritten (_2, _3 … appended)."),
                io.Combo.Input("device", options=["auto", "cpu", "cuda"], default="auto", tooltip="Where SVDs run."),
                io.Int.Input("threads", default=0, min=0, max=256, optional=True, tooltip="CPU threads for bases and projections; 0 = half the cores, "
                             "at most 4, so that sampling beside the transfer keeps most of the machine."),
                io.Float.Input("cache_max_gb", default=DEFAULT_MAX_GB, min=0.0, max=4096.0, step=0.5, optional=True,
                               tooltip="Size limit of the basis cache (ComfyUI user folder): after the run the least recently used bases are "
                                       "removed until it fits. 0 keeps no bases. Clear it with the ProLoRA Cache node."),
            ],
            outputs=[
                io.String.Output(display_name="lora_names", tooltip="Saved file names (one per line), as core 'Load LoRA' lists them."),
                io.String.Output(display_name="report", tooltip="What was transferred and skipped."),
            ],
        )

    @classmethod
    def execute(cls, source_model: str, target_model: str, lora_name: str, more_loras: str, mode: str, subspace_rank: int,
                threshold: float, pairing: str, filename_pattern: str, device: str, threads: int = 0, cache_max_gb: float = DEFAULT_MAX_GB) -> io.NodeOutput:
        names = [lora_name] + [n.strip() for n in more_loras.splitlines() if n.strip()]
        paths = []
        for n in names:
            p = folder_paths.get_full_path("loras", n)
            if p is None:
                raise ProLoRAError("not found in models/loras", file=n)
            paths.append(Path(p))
        config = TransferConfig(mode=mode, subspace_rank=subspace_rank or None, threshold=threshold, pairing=pairing, device=engine_device(device),
                                cpu_threads=threads or default_threads())
        stems = [output_stem(filename_pattern, p, target_model, source_model, mode) for p in paths]
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
        evicted = cache.limit(cache_max_gb)
        saved, lines = [], [(f"ProLoRA {mode}, pairing {pairing}: {source.label} → {target.label}; bases computed {stats.svd_computed}, "
                             f"from cache {stats.bases_from_cache}; CPU threads {config.threads}")]
        for result, path, stem in zip(results, paths, stems):
            s = result.summary()
            lines += format_summary(path.name, s, threshold)
            if s["transferred"] == 0:
                lines.append("  nothing written")
                continue
            out = free_path(path.parent, stem)
            atomic_save(result.tensors, out, output_metadata(result, source.label, target.label, config))
            saved.append(lora_list_name(out))
            lines.append(f"  saved as {saved[-1]}")
        lines.append(cache.describe(cache_max_gb) + (f"; removed the {evicted} least recently used" if evicted else ""))
        if not saved:
            raise ProLoRAError("no module could be transferred:\n" + "\n".join(lines))
        return io.NodeOutput("\n".join(saved), "\n".join(lines), ui={"text": lines})


def lora_list_name(path: Path) -> str:
    """The name core 'Load LoRA' lists a file in models/loras under (``sdxl/ink__to_ssd-1b.safetensors``)."""
    for root in folder_paths.get_folder_paths("loras"):
        try:
            return path.resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            continue
    return path.name
