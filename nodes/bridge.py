"""ComfyUI-side adapters for the engine: model weights as a WeightSource, ComfyUI's own LoRA key
maps, the LORA_MODEL dict with its metadata, progress and interrupt. No math here."""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import comfy.lora
import comfy.model_management
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch

from ..prolora_core.basis import BasisSettings
from ..prolora_core.cache import BasisCache
from ..prolora_core.lora import LoraFile
from ..prolora_core.slices import SlicedWeights, place_key
from ..prolora_core.weights import content_key_of_tensor

UNET, CLIP = "unet", "clip"


class LoraModel(dict):
    """A ``LORA_MODEL`` (``dict[str, Tensor]``, what core ``LoraModelLoader``/``SaveLoRA`` take) that
    also carries the file's metadata, per output module the name the input format used, report
    lines naming what of its input was not used (``unused``) and — for the output of **Project
    LoRA** — the per-module reports of the projection that made it (``projection``:
    ``ModuleReport`` list; the options are in ``metadata["prolora.*"]``).

    The parsed form of the tensors is kept on the object (:meth:`parsed`), so a graph that feeds
    one LoRA to Match Modules and Project LoRA parses it once.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                 save_names: dict[str, str] | None = None, source_file: str | None = None,
                 unused: list[str] | None = None, projection: tuple[Any, ...] | None = None) -> None:
        super().__init__(tensors)
        self.metadata: dict[str, str] = dict(metadata or {})
        self.save_names: dict[str, str] = dict(save_names or {})
        self.source_file = source_file
        self.unused: list[str] = list(unused or [])
        self.projection = projection
        self._parsed: tuple[tuple, LoraFile] | None = None

    def _fingerprint(self) -> tuple:
        """What the parse depends on: each key with its tensor *object* (held by reference, so an id
        can never be reused while cached) and in-place version counter, the metadata and the file.
        Inference tensors (made under ``torch.inference_mode``, as ComfyUI runs nodes) have no
        version counter: for them a replaced tensor is detected, an in-place edit is not — nodes
        never edit their inputs in place (ComfyUI hands one output to every consumer)."""
        return (tuple((k, t, -1 if t.is_inference() else t._version) for k, t in self.items()),
                tuple(sorted(self.metadata.items())), self.source_file)

    def parsed(self, parse: Callable[["LoraModel"], LoraFile]) -> LoraFile:
        """``parse(self)``, computed once while the tensors, metadata and file stay the same (a
        changed, added or in-place modified tensor parses again)."""
        fp = self._fingerprint()
        if self._parsed is not None and _same(self._parsed[0], fp):
            return self._parsed[1]
        lora = parse(self)
        self._parsed = (fp, lora)
        return lora


class ReadOnlyDict(dict):
    """A ``dict`` that refuses changes: what node outputs hold, since ComfyUI caches them and hands
    the same object to every consumer (and to later runs)."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("node outputs are read-only; build a new object instead")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _refuse  # type: ignore[assignment]

    def __reduce__(self) -> tuple:  # copy / deepcopy / pickle build a new one instead of filling it
        return (type(self), (dict(self),))


def _same(a: tuple, b: tuple) -> bool:
    (ta, ma, fa), (tb, mb, fb) = a, b
    return ma == mb and fa == fb and len(ta) == len(tb) and all(
        ka == kb and xa is xb and va == vb for (ka, xa, va), (kb, xb, vb) in zip(ta, tb))


class PatcherWeights:
    """Effective weights of a ComfyUI ``ModelPatcher`` (``MODEL`` or a ``CLIP``'s patcher).

    Weights are read by reference from the model's state dict (no extra copy); where the patcher
    holds patches (merges, LoRAs) the patched weight is built for that one key with ComfyUI's own
    ``comfy.lora.calculate_weight``.
    """

    def __init__(self, patcher: Any, label: str) -> None:
        self.patcher = patcher
        self.label = label
        self._sd: dict[str, torch.Tensor] = patcher.model.state_dict()
        self._last: tuple[str, torch.Tensor] | None = None
        self._backups = _original_weights(patcher)

    def keys(self) -> list[str]:
        return list(self._sd)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._sd[key].shape)

    def get(self, key: str) -> torch.Tensor:
        """The weight as the model computes with it: the original (from the patcher's backup when
        ComfyUI currently holds the model with patches applied in place), converted by the op's
        own ``convert_*`` (quantized ops), then the patcher's patches."""
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        w, _, convert = comfy.model_patcher.get_key_weight(self.patcher.model, key)
        backup = self._backups.get(key)
        if backup is not None:
            w = backup.weight
        hook_backup = self.patcher.hook_backup.get(key)
        if hook_backup is not None:
            w = hook_backup[0]
        w = w.detach()
        patches = self.patcher.patches.get(key)
        if convert is not None or patches:
            w = w.to(torch.float32, copy=True)
            if convert is not None:
                w = convert(w, inplace=True)
            if patches:
                w = comfy.lora.calculate_weight(patches, w, key)
        self._last = (key, w)
        return w

    def content_key(self, key: str) -> str:
        return content_key_of_tensor(self.get(key))

    def patched_keys(self) -> int:
        return sum(1 for k in self.patcher.patches if k in self._sd)


def _original_weights(patcher: Any) -> dict[str, Any]:
    """Backups of the original weights of ``patcher``'s model.

    Clones of a ModelPatcher share one model object; while ComfyUI holds a clone loaded with
    its patches applied in place, the model's tensors are the *clone's* patched weights and only
    that clone's backup holds the originals. Our own backup is used when we are the patched one.
    """
    uuid = getattr(patcher.model, "current_weight_patches_uuid", None)
    if uuid is None or uuid == getattr(patcher, "patches_uuid", None):
        return dict(patcher.backup)
    for loaded in comfy.model_management.current_loaded_models:
        other = loaded.model
        if other is not None and other.model is patcher.model and getattr(other, "patches_uuid", None) == uuid:
            return dict(other.backup)
    return dict(patcher.backup)


@dataclass(frozen=True)
class BasisHandle:
    """What **Compute Basis** gives: a model's weights, ComfyUI's LoRA key maps for it, the subspace
    rank and where bases are computed and cached. Bases themselves are computed lazily by **Match
    Modules**, only for the modules a LoRA touches.

    Immutable (ComfyUI caches node outputs and hands the same object to every consumer): the
    fields cannot be reassigned and the mappings are read-only views.
    """

    label: str
    parts: Mapping[str, SlicedWeights]  # PatcherWeights that also serve slices of fused weights
    key_maps: Mapping[str, Mapping[str, Any]]  # ComfyUI's: LoRA module → weight key, or (key, (dim, start, length))
    subspace_rank: int | None
    device: str
    settings: BasisSettings
    cache_dir: Path | None
    patched: Mapping[str, int] = field(default_factory=lambda: ReadOnlyDict())
    family: str = ""  # ComfyUI's model config class (``SDXL``, ``SSD1B``, ``SD15`` …), whatever the label

    def cache(self) -> BasisCache | None:
        return BasisCache(self.cache_dir, self.settings) if self.cache_dir is not None else None

    def settings_differ(self, other: "BasisHandle") -> list[str]:
        """The Compute Basis settings in which ``self`` (source) and ``other`` (target) differ, as
        ``"name (source …, target …)"``; Match Modules computes both bases with one setting."""
        out = []
        for name, a, b in (("subspace_rank", self.subspace_rank or 0, other.subspace_rank or 0), ("device", self.device, other.device),
                           ("use_cache", self.cache_dir is not None, other.cache_dir is not None), ("basis settings", self.settings, other.settings)):
            if a != b:
                out.append(f"{name} (source {_shown(a)}, target {_shown(b)})")
        return out

    def locate(self, lora_module: str) -> tuple[str, str] | None:
        """``(part, weight key)`` of a LoRA module name, through ComfyUI's key maps. A module ComfyUI
        applies to a slice of a fused weight (``(key, (dim, start, length))``, e.g. Flux's ``to_q`` →
        rows of ``img_attn.qkv``) gets the slice's virtual key, one ComfyUI applies through
        ``swap_scale_shift`` (diffusers' ``norm_out.linear``) the swapped view's (``prolora_core.slices``)."""
        for part, km in self.key_maps.items():
            key = place_key(km[lora_module], comfy.utils.swap_scale_shift) if lora_module in km else None
            if key is not None and self.parts[part].has(key):
                return part, key
        return None


def _shown(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, BasisSettings):
        return v.key()
    return "auto" if v == 0 else str(v)


def build_handle(model: Any, clip: Any | None, subspace_rank: int | None, device: str, cache: bool, label: str = "") -> BasisHandle:
    """A :class:`BasisHandle` for a ``MODEL`` (and optional ``CLIP``); ``label`` names it in reports
    and in the provenance of saved LoRAs (default: the model's type)."""
    family = _model_label(model)
    label = label.strip() or family
    parts = {UNET: SlicedWeights(PatcherWeights(model, label))}
    key_maps = {UNET: comfy.lora.model_lora_keys_unet(model.model, {})}  # the model's class picks the family's map
    if clip is not None:
        parts[CLIP] = SlicedWeights(PatcherWeights(clip.patcher, label + ":clip"))
        key_maps[CLIP] = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    return BasisHandle(
        label=label, parts=ReadOnlyDict(parts), key_maps=ReadOnlyDict({p: ReadOnlyDict(km) for p, km in key_maps.items()}),
        subspace_rank=subspace_rank, device=engine_device(device), settings=BasisSettings(), cache_dir=cache_dir() if cache else None,
        patched=ReadOnlyDict({p: w.patched_keys() for p, w in parts.items()}), family=family,
    )


def _model_label(model: Any) -> str:
    cfg = getattr(getattr(model, "model", None), "model_config", None)
    return type(cfg).__name__ if cfg is not None else type(model).__name__


def engine_device(choice: str) -> str:
    """``auto`` → ComfyUI's torch device when it is CUDA, else CPU (the engine's SVDs need LAPACK)."""
    if choice != "auto":
        return choice
    dev = comfy.model_management.get_torch_device()
    return "cuda" if getattr(dev, "type", str(dev)) == "cuda" else "cpu"


def cache_dir() -> Path:
    """The basis cache inside ComfyUI's user folder (``PROLORA_CACHE_DIR`` overrides)."""
    env = os.environ.get("PROLORA_CACHE_DIR")
    return Path(env) if env else Path(folder_paths.get_user_directory()) / "prolora" / "basis_cache"


def native_module(part: str, weight_key: str) -> str:
    """ComfyUI-native LoRA module name of a weight key (what ``model_lora_keys_*`` map generically)."""
    module = weight_key[: -len(".weight")] if weight_key.endswith(".weight") else weight_key
    return module if part == UNET else f"text_encoders.{module}"


def progress(total: int) -> Callable[[int, int, str], None]:
    """A ``ProgressFn`` that drives ComfyUI's progress bar."""
    bar = comfy.utils.ProgressBar(max(total, 1))

    def update(i: int, n: int, key: str) -> None:
        bar.update_absolute(i + 1, max(n, 1))

    return update


def check_interrupt() -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()
