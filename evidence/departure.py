"""A trial beyond both papers (issue 12, step 3): the departure-aware correction of a transferred LoRA.

The target's own departure from the source, ``D = W_t − W_s``, may already carry part of what
the LoRA adds (a fine-tune towards the LoRA's style, a distilled model that learned the same
shift). The correction removes that part, inside the LoRA's own row and column spaces so the rank
stays ``r``::

    Q_B = orth(up), Q_A = orth(downᵀ)            (m × r, n × r)
    D_L = Q_B Q_Bᵀ D Q_A Q_Aᵀ                       the departure seen by the LoRA
    c   = clamp(⟨ΔW, D_L⟩_F / ‖D_L‖_F², 0, 1)      how much of ΔW the target already has
    ΔW' = ΔW − c · D_L = Q_B (Q_Bᵀ ΔW Q_A − c Q_Bᵀ D Q_A) Q_Aᵀ

``c = 0`` (the departure points away from the LoRA, or is orthogonal to it) leaves ``ΔW`` as it is.
Applied to the engine's ``prolora-full`` output; the trial is kept only if the protocol shows it helps.
"""
from __future__ import annotations

import torch

from prolora_core.report import TransferResult
from prolora_core.weights import WeightSource

PREFIX = "model.diffusion_model."


def kohya_stem(weight_key: str) -> str:
    return "lora_unet_" + weight_key.removeprefix(PREFIX).removesuffix(".weight").replace(".", "_")


def departure_corrected(result: TransferResult, source: WeightSource, target: WeightSource) -> tuple[dict[str, torch.Tensor], list[float]]:
    """``result``'s kohya tensors with every transferred module corrected (float32, alpha = rank),
    and the coefficient ``c`` per module."""
    out = dict(result.tensors)
    coeffs = []
    for m in result.modules:
        if not m.transferred or m.target_key is None or m.source_key is None:
            continue
        stem = kohya_stem(m.target_key)
        up_t, down_t = out[f"{stem}.lora_up.weight"], out[f"{stem}.lora_down.weight"]
        r = int(down_t.shape[0])
        alpha = out.get(f"{stem}.alpha")
        scale = float(alpha) / r if alpha is not None else 1.0
        up = up_t.double().reshape(up_t.shape[0], r)
        down = down_t.double().reshape(r, -1)
        D = (target.get(m.target_key).double() - source.get(m.source_key).double()).reshape(up.shape[0], -1)
        Qb, _ = torch.linalg.qr(up)
        Qa, _ = torch.linalg.qr(down.T)
        core = scale * (Qb.T @ up) @ (down @ Qa)  # Q_Bᵀ ΔW Q_A
        dl = Qb.T @ D @ Qa  # Q_Bᵀ D Q_A: ‖D_L‖ = ‖dl‖, ⟨ΔW, D_L⟩ = ⟨core, dl⟩
        den = float(dl.square().sum())
        c = min(1.0, max(0.0, float((core * dl).sum()) / den)) if den > 0 else 0.0
        coeffs.append(c)
        new_up = Qb @ (core - c * dl)
        out[f"{stem}.lora_up.weight"] = new_up.float().reshape(up_t.shape).contiguous()
        out[f"{stem}.lora_down.weight"] = Qa.T.float().reshape(down_t.shape).contiguous()
        out[f"{stem}.alpha"] = torch.tensor(float(r), dtype=torch.float32)
    return out, coeffs
