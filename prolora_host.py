"""ComfyUI's reading of a base model *file*: its detected family and ComfyUI's LoRA key map for it.

Used by the Transfer LoRA (files) node (inside ComfyUI) and by the CLI (``python -m prolora_core``,
imported lazily, only when the ComfyUI host can be imported). It sits outside ``prolora_core`` because
it imports ComfyUI, and outside ``nodes/`` because the CLI cannot import that package: its name is
ComfyUI's own top-level ``nodes`` module's.

Inside ComfyUI this file is a module of the pack (``<pack>.prolora_host``) and the core is
``<pack>.prolora_core``; run from the CLI it is a top-level module beside the top-level
``prolora_core``. :func:`ensure_host` makes ComfyUI importable for the CLI: ``$PROLORA_COMFYUI_DIR``
or ``.comfyui`` next to this file goes to the front of ``sys.path`` (so ComfyUI's ``nodes`` wins over
the pack's ``nodes/`` folder in the current directory) and ComfyUI's argument parsing is switched off
before ``comfy.model_management`` is imported (it would parse the CLI's arguments).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

if __package__:  # a module of the pack (inside ComfyUI): the core is the pack's
    from .prolora_core.errors import ProLoRAError
    from .prolora_core.file_transfer import DetectedModel
    from .prolora_core.slices import parse_place, place_key
else:  # top-level, beside the top-level prolora_core (the CLI)
    from prolora_core.errors import ProLoRAError
    from prolora_core.file_transfer import DetectedModel
    from prolora_core.slices import parse_place, place_key

HERE = Path(__file__).resolve().parent


def comfyui_dir() -> Path:
    """Where the CLI looks for ComfyUI: ``$PROLORA_COMFYUI_DIR``, else ``.comfyui`` beside the pack."""
    return Path(os.environ.get("PROLORA_COMFYUI_DIR", HERE / ".comfyui")).resolve()


def ensure_host() -> bool:
    """Make ``comfy`` importable without side effects on ComfyUI's settings; ``False`` when there is no
    ComfyUI to import. A no-op when ComfyUI is already imported in this process (inside ComfyUI, or a
    test session that set it up)."""
    if "comfy.model_management" in sys.modules or "comfy.options" in sys.modules:
        return True
    root = comfyui_dir()
    if not (root / "comfy" / "lora.py").is_file():
        return importlib.util.find_spec("comfy") is not None and importlib.util.find_spec("comfy.lora") is not None
    sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != root]
    sys.path.insert(0, str(root))
    stale = sys.modules.get("nodes")
    if stale is not None and Path(getattr(stale, "__file__", "") or "").resolve().parent == HERE / "nodes":
        del sys.modules["nodes"]  # the pack's nodes/ folder, picked up from the current directory
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    args.cpu = True  # only the meta device is used here: no GPU is set up for a key map
    return True


def detect_model(weights: Any) -> DetectedModel | None:
    """The model in a base file as ComfyUI sees it, with ComfyUI's LoRA key map for it; ``None``
    when ComfyUI does not recognise the file (plain ``<module>.weight`` files: the caller pairs by
    names).

    The model type comes from ComfyUI's detection on the file's shapes (meta tensors, nothing is
    loaded), or from a ``prolora.unet_config`` in the metadata (the pack's tiny models). The map is
    built on a real model object of that class on the meta device (no weight memory), so every
    family branch of ``comfy.lora.model_lora_keys_unet`` applies (Flux's q/k/v slices of the fused
    ``qkv``, SD3, Wan, Qwen-Image …). Entries whose weight the file lacks, and targets the engine
    cannot serve (a function other than ``swap_scale_shift`` applied to the update), are left out:
    their modules are reported unmapped. Raises :class:`ProLoRAError` when ComfyUI detects a family
    whose detected config it cannot build (ComfyUI 0.3.75 reads every FLUX.2 file as FLUX.2-dev's
    48 heads of 128, so a Klein 4B/9B file fails in its own loader too)."""
    import comfy.lora
    import comfy.model_detection
    import comfy.supported_models
    import comfy.utils

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
        except Exception:  # detection reads shapes of keys a foreign file may lack
            return None
        if config is None:
            return None
    try:
        model = config.get_model({}, "", device=torch.device("meta"))
    except Exception as e:  # detected, but the detected config does not build (ComfyUI 0.3.75 on FLUX.2 Klein: 48 heads of 128 assumed)
        width = next((f" ({k} {config.unet_config[k]})" for k in ("hidden_size", "dim") if k in config.unet_config), "")
        raise ProLoRAError(f"ComfyUI detects {type(config).__name__}{width} in this file but cannot build that model "
                           f"({type(e).__name__}: {e}); ComfyUI's own loader fails on it the same way",
                           file=getattr(weights, "path", weights.label)) from e
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
    for name, key in text_encoder_key_map(config, meta_sd, prefix).items():
        out.setdefault(name, key)
    return DetectedModel(type(config).__name__, out, dict(config.unet_config), prefix)


def text_encoder_key_map(config: Any, meta_sd: dict[str, torch.Tensor], unet_prefix: str) -> dict[str, str]:
    """LoRA module name → weight key in the file (or a slice's virtual key) for the text encoders a
    checkpoint carries (SD1.5 ``cond_stage_model.…``, SDXL ``conditioner.embedders.0/1.…``), as
    ComfyUI's checkpoint loader and LoRA loader see them.

    ComfyUI's checkpoint loader renames the file's text-encoder keys with the model config's
    ``process_clip_state_dict`` (``cond_stage_model.`` → ``clip_l.``; OpenCLIP's fused
    ``attn.in_proj_weight`` split into ``q_proj``/``k_proj``/``v_proj`` row blocks) and loads the result
    into the text-encoder model; ``comfy.lora.model_lora_keys_clip`` maps LoRA names onto that model's
    state-dict keys (by key names only: it tests no class). The same renaming runs here on the
    file's meta tensors, and each renamed tensor is traced back to the file key it came from: the
    same tensor object (renamed), or a row view of one (a block of a fused weight: the slice
    ``(key, (0, start, length))``). The key map is then ComfyUI's on the renamed keys the file
    provides. Empty for a file without text encoders (a diffusion model alone)."""
    import comfy.lora
    import comfy.utils

    origin = {id(t): k for k, t in meta_sd.items() if not (unet_prefix and k.startswith(unet_prefix))}
    if not origin:
        return {}
    try:
        renamed = config.process_clip_state_dict({k: t for k, t in meta_sd.items() if id(t) in origin})
    except Exception:  # a family whose renaming needs values (not shapes) or keys the file lacks: no text-encoder map
        return {}
    places: dict[str, Any] = {}
    for key, t in renamed.items():
        if not isinstance(t, torch.Tensor):
            continue
        if id(t) in origin:
            places[key] = origin[id(t)]
            continue
        base = t._base
        if base is not None and id(base) in origin and t.dim() == base.dim() and t.shape[1:] == base.shape[1:] and t.is_contiguous():
            row = base.stride(0)
            places[key] = (origin[id(base)], (0, t.storage_offset() // row, t.shape[0]))
    if not places:
        return {}

    class _TextEncoderKeys:
        """What ``model_lora_keys_clip`` reads of a text-encoder model: its state-dict key names."""

        @staticmethod
        def state_dict() -> dict[str, Any]:
            return places

    out: dict[str, str] = {}
    for name, target in comfy.lora.model_lora_keys_clip(_TextEncoderKeys(), {}).items():
        place = places.get(target) if isinstance(target, str) else None
        key = place_key(place, comfy.utils.swap_scale_shift) if place is not None else None
        if key is not None:
            out[name] = key
    return out


def file_key_map(weights: Any) -> dict[str, str]:
    """LoRA module name → weight key in the file (or a slice's virtual key): :func:`detect_model`'s
    map. Raises :class:`ProLoRAError` when ComfyUI cannot detect the model type."""
    found = detect_model(weights)
    if found is None:
        raise ProLoRAError("ComfyUI cannot detect the model type of this file", file=weights.path)
    return dict(found.key_map)
