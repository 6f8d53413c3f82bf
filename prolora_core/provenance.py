"""Metadata written into a transferred LoRA: the input's own metadata kept, provenance added.

No timestamps and no absolute paths: the same inputs give the same file. Recorded for a rerun:
every option that changes the result, the basis settings, the device kind and the torch version
(results differ in the last bits across devices, torch versions and, without
``--deterministic``, thread counts).
"""
from __future__ import annotations

import torch

from .linalg import resolve_device
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
        "prolora.deterministic": str(config.basis.deterministic).lower(),
        "prolora.save_dtype": str(config.save_dtype).removeprefix("torch.") if config.save_dtype is not None else "keep",
        "prolora.device": resolve_device(config.device).type,
        "prolora.torch": torch.__version__,
        "prolora.modules_in": str(s["modules"]),
        "prolora.modules_transferred": str(s["transferred"]),
        "prolora.modules_below_threshold": str(s["below_threshold"]),
        "prolora.modules_without_base_weight": str(s["no_base_weight"]),
    })
    if config.mode == "casa":
        c = config.casa
        meta["prolora.casa"] = f"energy={c.energy:g},tau={c.tau:g},rho={c.rho:g},arbitrate_q={c.arbitrate_q:g}"
    if s["energy_dropped"] is not None:
        meta["prolora.energy_dropped"] = f"{s['energy_dropped']:.6g}"
    return meta
