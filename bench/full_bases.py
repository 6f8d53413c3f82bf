"""What mode ``casa``'s full source bases cost: the bytes of the thin SVD ``U`` (m × d), ``S`` (d),
``V`` (n × d), d = min(m, n), of every weight a LoRA may touch, per model, as the engine keeps them
(:mod:`prolora_core.full_bases`: exact, in CASA's compute dtype — float64 on the CPU up to 4 M
entries, float32 above and on CUDA), and in float32 / float16 for comparison. Arithmetic only, from
the real shapes: SDXL's 722 transformer linears (bench/shapes.py) and every 2-D block weight of
Flux-dev and Wan-14B (bench/layouts.json, ComfyUI's own classes).

    .venv/bin/python -m bench.full_bases
"""
from __future__ import annotations

import torch

from prolora_core.casa import compute_dtype
from prolora_core.full_bases import DEFAULT_MEMORY_MB, svd_bytes

from .shapes import block_layout, sdxl_modules

GB = 2**30


def models() -> dict[str, list[tuple[int, int]]]:
    return {"SDXL UNet (722 transformer linears)": [m.shape for m in sdxl_modules()],
            "Flux-dev (all 2-D block weights)": [s for _, s in block_layout("flux-dev")],  # type: ignore[misc]
            "Wan-14B (all 2-D block weights)": [s for _, s in block_layout("wan-14b")]}  # type: ignore[misc]


def table() -> list[str]:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    lines = ["| model | weights | weight fp16 | full SVDs, CPU (as kept) | largest one | full SVDs, CUDA / float32 | float16 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, shapes in models().items():
        kept = [svd_bytes(m, n, compute_dtype(m, n, cpu)) for m, n in shapes]
        f32 = sum(svd_bytes(m, n, compute_dtype(m, n, cuda)) for m, n in shapes)
        f16 = sum(svd_bytes(m, n, torch.float16) for m, n in shapes)
        fp16_w = 2 * sum(m * n for m, n in shapes)
        lines.append(f"| {name} | {len(shapes)} | {fp16_w / GB:.2f} GB | {sum(kept) / GB:.1f} GB | {max(kept) / 2**20:.0f} MB "
                     f"| {f32 / GB:.1f} GB | {f16 / GB:.1f} GB |")
    lines.append(f"(GB = 2**30 bytes. In-memory budget per run: {DEFAULT_MEMORY_MB} MB, the first that fit are kept for the run; "
                 "on disk: the basis cache's size limit, --cache-max-gb, LRU after each run.)")
    return lines


if __name__ == "__main__":
    print("\n".join(table()))
