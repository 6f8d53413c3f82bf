"""Metadata written into a transferred LoRA: the input's own metadata kept, provenance added, and
the fields that describe the tensors or the base model made true for the output.

* Kept: trigger words, tags (``ss_tag_frequency``), titles, training settings — what the LoRA *means*.
* Hashes of the tensors (``sshs_model_hash``, ``sshs_legacy_hash``, written by kohya's sd-scripts
  and read by WebUI extensions and model sites to identify a file) are recomputed for the output
  with sd-scripts' own algorithm (:func:`kohya_hashes`); the input's go to ``prolora.source_sshs_*``.
* Base-model fields (``ss_base_model_version``, ``modelspec.architecture``) name the target where
  its family is known (:data:`BASE_MODEL_FIELDS`); otherwise they are dropped, since the input's
  value names the source. The input's value goes to ``prolora.original_*``.

No timestamps and no absolute paths: the same inputs give the same file. Recorded for a rerun:
every option that changes the result, the basis settings, the device kind and the torch version
(results differ in the last bits across devices, torch versions and, without
``--deterministic``, thread counts).
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from safetensors.torch import save

from .auto import AUTO_MAX_DEPARTURE
from .linalg import resolve_device
from .transfer import TransferConfig, TransferResult

VERSION = "0.1.0"

#: ComfyUI model family (its ``supported_models`` config class) → (kohya ``ss_base_model_version``,
#: SAI ModelSpec architecture before "/<adapter>"), in sd-scripts' own spelling
#: (``get_model_version_str_for_sd1_sd2``, ``sdxl_train_util.MODEL_VERSION_SDXL_BASE_V1_0``,
#: ``sai_model_spec.ARCH_*``). Families without an established spelling (SSD-1B, Vega, SD2 whose
#: v-prediction the class does not tell) are not listed: their fields are dropped.
BASE_MODEL_FIELDS: dict[str, tuple[str, str]] = {
    "SD15": ("sd_v1", "stable-diffusion-v1"),
    "SDXL": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base"),
}
HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash")
_BASE_KEYS = ("ss_base_model_version", "modelspec.architecture")


def kohya_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """``sshs_model_hash`` and ``sshs_legacy_hash`` of a LoRA as kohya's sd-scripts precompute them
    (``train_util.precalculate_safetensors_hashes``, the hashes of sd-webui-additional-networks):
    the tensors serialised by ``safetensors.torch.save`` with only the ``ss_*`` metadata; the model
    hash is the SHA-256 (hex) of everything after the header, the legacy hash the first 8 hex
    digits of the SHA-256 of the 64 KiB at offset 1 MiB (of nothing, for a file shorter than that).
    """
    training = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = save({k: t.contiguous() for k, t in tensors.items()}, metadata=training)
    n = int.from_bytes(data[:8], "little")
    return {"sshs_model_hash": hashlib.sha256(data[8 + n:]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(data[0x100000:0x100000 + 0x10000]).hexdigest()[:8]}


def refresh_tensor_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """``metadata`` with the ``sshs_*`` hashes recomputed for ``tensors`` (as saved: key names
    change the file) when it carries them; unchanged otherwise."""
    meta = dict(metadata)
    if any(k in meta for k in HASH_KEYS):
        for k in HASH_KEYS:
            meta.pop(k, None)
        meta.update(kohya_hashes(tensors, meta))
    return meta


def _name_target_base(meta: dict[str, str], target_family: str | None) -> None:
    known = BASE_MODEL_FIELDS.get(target_family or "")
    for key, value in zip(_BASE_KEYS, known or (None, None)):
        if key not in meta:
            continue
        original = meta.pop(key)
        if key == "modelspec.architecture" and value is not None:
            value = f"{value}/{original.partition('/')[2] or 'lora'}"  # the adapter part stays
        if value != original:
            meta[f"prolora.original_{key}"] = original
        if value is not None:
            meta[key] = value


def output_metadata(result: TransferResult, source_label: str, target_label: str, config: TransferConfig,
                    target_family: str | None = None) -> dict[str, str]:
    """The input metadata (trigger words, ``ss_tag_frequency``, ``modelspec.*`` …) plus ``prolora.*``,
    with the base-model fields naming ``target_family`` (ComfyUI's model config class, e.g. "SDXL";
    ``None``: not known, the fields are dropped) and the tensor hashes recomputed for
    ``result.tensors`` (see :func:`refresh_tensor_hashes`; a writer that renames keys refreshes them)."""
    meta = dict(result.lora.metadata)
    s = result.summary()
    for key in HASH_KEYS:
        if key in meta:
            meta[f"prolora.source_{key}"] = meta[key]
    _name_target_base(meta, target_family)
    if "ss_sd_model_name" in meta:
        meta["prolora.original_ss_sd_model_name"] = meta["ss_sd_model_name"]
        meta["ss_sd_model_name"] = target_label
    if "modelspec.title" in meta:
        meta["modelspec.title"] = f"{meta['modelspec.title']} (ProLoRA → {target_label})"
    meta.update({
        "prolora.version": VERSION,
        "prolora.source_base": source_label,
        "prolora.target_base": target_label,
        "prolora.mode": config.mode,
        "prolora.subspace_rank": str(config.subspace_rank) if config.subspace_rank is not None else "auto:min(64,d//4)",
        "prolora.threshold": f"{config.threshold:g}",
        "prolora.pairing": config.pairing,
        "prolora.out_rank": str(config.out_rank) if config.out_rank is not None else "none",
        "prolora.rescale_to_source_norm": str(config.rescale_to_source_norm).lower(),
        "prolora.basis": config.basis.key(),
        "prolora.deterministic": str(config.basis.deterministic).lower(),
        "prolora.save_dtype": str(config.save_dtype).removeprefix("torch.") if config.save_dtype is not None else "keep",
        "prolora.device": resolve_device(config.device).type,
        "prolora.torch": torch.__version__,
        "prolora.modules_in": str(s["modules"]),
        "prolora.modules_transferred": str(s["transferred"]),
        "prolora.modules_below_threshold": str(s["below_threshold"]),
        "prolora.modules_without_base_weight": str(s["no_base_weight"]),
    })
    if target_family:
        meta["prolora.target_family"] = target_family
    if config.mode == "auto":
        meta["prolora.auto_max_departure"] = f"{AUTO_MAX_DEPARTURE:g}"
    if config.mode in ("casa", "auto"):
        c = config.casa
        meta["prolora.casa"] = f"energy={c.energy:g},tau={c.tau:g},rho={c.rho:g},arbitrate_q={c.arbitrate_q:g}"
    if s["energy_dropped"] is not None:
        meta["prolora.energy_dropped"] = f"{s['energy_dropped']:.6g}"
    return refresh_tensor_hashes(result.tensors, meta)
