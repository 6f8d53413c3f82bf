"""Metadata written into a transferred LoRA: the input's own metadata kept, provenance added.

No timestamps and no absolute paths: the same inputs give the same file.
"""
from __future__ import annotations

from .transfer import TransferConfig, TransferResult

VERSION = "0.1.0"


def output_metadata(result: TransferResult, source_label: str, target_label: str, config: TransferConfig) -> dict[str, str]:
    """The input metadata (trigger words, ``ss_tag_frequency``, ``modelspec.*`` …) plus ``prolora.*``."""
    meta = dict(result.lora.metadata)
    s = result.summary()
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
        "prolora.modules_in": str(s["modules"]),
        "prolora.modules_transferred": str(s["transferred"]),
        "prolora.modules_below_threshold": str(s["below_threshold"]),
        "prolora.modules_without_base_weight": str(s["no_base_weight"]),
    })
    if s["energy_dropped"] is not None:
        meta["prolora.energy_dropped"] = f"{s['energy_dropped']:.6g}"
    return meta
