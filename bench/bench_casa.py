"""What mode ``casa`` costs per module at SDXL and Flux scale: the full SVD of the source weight it
needs, and the whole CASA update (SVD, coordinates, arbitration, re-compression), timed per
distinct shape and summed over a model's module counts. Not a test: nothing asserts on timings.

    .venv/bin/python -m bench.bench_casa --device cpu [--flux]      # CPU (threads: torch's default)
    python -m bench.bench_casa --device cuda --flux                   # on a CUDA machine

Bytes are those of the full thin bases ``U`` (m × d) and ``V`` (n × d) in float32, d = min(m, n):
what caching them would store per module.
"""
from __future__ import annotations

import argparse
import os
import time
from collections import Counter

import torch

from prolora_core.casa import CasaSettings, casa_update, compute_dtype

from .shapes import sdxl_modules

#: Flux.1 (19 double blocks: img and txt streams; 38 single blocks), linear weights a LoRA usually touches.
FLUX = Counter({(9216, 3072): 38, (3072, 3072): 38, (12288, 3072): 38, (3072, 12288): 38, (21504, 3072): 38, (3072, 15360): 38})


def weight(m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    d = min(m, n)
    s = torch.arange(1, d + 1, dtype=torch.float32) ** -0.5
    U = torch.linalg.qr(torch.randn(m, d, generator=gen))[0]
    V = torch.linalg.qr(torch.randn(n, d, generator=gen))[0]
    return (U * s) @ V.T


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_shape(m: int, n: int, dev: torch.device, rank: int) -> tuple[float, float, float]:
    """(seconds of the float32 full thin SVD, seconds of casa_update, peak GPU GiB or 0)."""
    gen = torch.Generator().manual_seed(m * 7 + n)
    ws = weight(m, n, gen)
    wt = ws + 0.01 * torch.randn(m, n, generator=gen) * ws.std()
    delta = 0.01 * torch.randn(m, rank, generator=gen) @ torch.randn(rank, n, generator=gen)
    w_dev = ws.to(dev)
    sync(dev)
    t0 = time.perf_counter()
    torch.linalg.svd(w_dev, full_matrices=False)
    sync(dev)
    t_svd = time.perf_counter() - t0
    del w_dev
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    casa_update(delta, ws, wt, rank, CasaSettings(), dev)
    sync(dev)
    t_casa = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else 0.0
    return t_svd, t_casa, peak


def table(name: str, counts: Counter, dev: torch.device, rank: int) -> str:
    lines = [f"\n### {name} on {dev.type} ({torch.cuda.get_device_name() if dev.type == 'cuda' else f'{torch.get_num_threads()} threads'})\n",
             "| shape (m × n) | modules | casa dtype | full SVD fp32 s | casa s/module | GPU peak GiB | bases fp32 MiB/module |",
             "|---|---|---|---|---|---|---|"]
    tot_svd = tot_casa = tot_bytes = 0.0
    for (m, n), count in sorted(counts.items()):
        t_svd, t_casa, peak = time_shape(m, n, dev, rank)
        d = min(m, n)
        nbytes = 4 * (m * d + n * d + d)
        tot_svd, tot_casa, tot_bytes = tot_svd + count * t_svd, tot_casa + count * t_casa, tot_bytes + count * nbytes
        lines.append(f"| {m} × {n} | {count} | {str(compute_dtype(m, n, dev)).removeprefix('torch.')} | {t_svd:.3f} | {t_casa:.3f} | "
                     f"{peak:.2f} | {nbytes / 2**20:.1f} |")
        print(lines[-1], flush=True)
    lines.append(f"| **all {sum(counts.values())}** | | | **{tot_svd:.0f} s** | **{tot_casa:.0f} s** | | **{tot_bytes / 2**30:.1f} GiB** |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_casa", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--flux", action="store_true", help="also Flux.1's shapes")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.linalg.svd(torch.randn(64, 64, device=dev))  # warm-up (CUDA context, solver handles)
    text = table("SDXL (722 linear modules of the transformer blocks)", Counter(m.shape for m in sdxl_modules()), dev, args.rank)
    if args.flux:
        text += "\n" + table("Flux.1 (double + single blocks, 228 linear modules)", FLUX, dev, args.rank)
    print(text)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, f"bench_casa_{dev.type}.md"), "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
