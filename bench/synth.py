"""Synthetic SDXL-shaped base weights and LoRAs for the benchmark, written once and re-used.

Spectra (``d = min(m, n)``, ``k`` = the engine's default subspace rank ``min(64, d // 4)``):

* ``gapped``: the top-k singular values run linearly from 100 down to 10; the other ``d − k`` come
  from a Gaussian matrix squeezed into the orthogonal complement of the top-k singular vectors on
  both sides and scaled so that its largest singular value is ≈ 1. So the top-k values are 10–100×
  the rest (a gap of ≈ 10 at k) and every singular vector is Haar-random.
* ``powerlaw``: ``σ_i = i^(−1/2)`` for ``i = 1..d`` with Haar-random ``U``, ``V`` (QR of Gaussians):
  no gap anywhere, like trained weights.

The target is ``source + ρ·σ_1·G/(√m + √n)`` with ``G`` Gaussian (spectral norm ≈ ``ρ·σ_1``); the
default ``ρ = 0.005`` keeps Φ well above 0.8 on the gapped spectrum. Both weights are then scaled
by the same factor so the source's entries have an RMS of 0.02 (a real UNet's order of magnitude)
and stored in fp16 (or ``--weight-dtype``) under ``model.diffusion_model.<module>.weight``.

The two LoRAs (``lora_a`` for the cold run, ``lora_b`` for the warm one) are rank 8, kohya-dotted
(``<module>.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha``), float32 so that the output
(written in the LoRA's dtype) adds no fp16 rounding to the measured error.

The base files are streamed: the header is written first (every shape is known), then each
module's bytes, so two models are never held in memory.
"""
from __future__ import annotations

import json
import math
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors.torch import save_file

from .shapes import Module

FORMAT_VERSION = 2
RMS = 0.02
LORA_RANK = 8
LORA_ALPHA = 4.0
_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float8_e4m3fn: "F8_E4M3"}


def subspace_rank(m: int, n: int) -> int:
    """The engine's default k rule (``prolora_core.basis.default_rank``), restated."""
    return max(1, min(64, min(m, n) // 4))


class StreamingSafetensors:
    """Write a safetensors file tensor by tensor, in the order of ``entries``: ``(key, shape)`` in
    ``dtype``, or ``(key, shape, dtype)`` for an entry of its own dtype (header first, every shape
    known; renamed into place on :meth:`close`)."""

    def __init__(self, path: Path, entries: Sequence[tuple[str, tuple[int, ...]] | tuple[str, tuple[int, ...], torch.dtype]],
                 dtype: torch.dtype, metadata: dict[str, str] | None = None) -> None:
        self.path = path
        header: dict[str, object] = {"__metadata__": metadata or {}}
        off = 0
        self.order: list[tuple[str, torch.dtype]] = []
        for key, shape, *own in entries:
            dt = own[0] if own else dtype
            nbytes = torch.tensor([], dtype=dt).element_size() * math.prod(shape)
            header[key] = {"dtype": _ST_DTYPES[dt], "shape": list(shape), "data_offsets": [off, off + nbytes]}
            off += nbytes
            self.order.append((key, dt))
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.total = off
        self.tmp = path.with_name(path.name + ".partial")
        self.fh: BinaryIO = open(self.tmp, "wb")
        self.fh.write(struct.pack("<Q", len(raw)))
        self.fh.write(raw)
        self.next = 0

    def write(self, key: str, t: torch.Tensor) -> None:
        want, dt = self.order[self.next]
        if key != want:
            raise RuntimeError(f"expected {want}, got {key}")
        self.fh.write(t.detach().to("cpu", dt).contiguous().view(torch.uint8).numpy().data)
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.order):
            raise RuntimeError(f"{self.path}: {len(self.order) - self.next} tensors never written")
        self.fh.close()
        self.tmp.replace(self.path)


def _haar(rows: int, cols: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """``rows × cols`` with orthonormal columns, Haar-distributed (QR of a Gaussian, signs fixed)."""
    Q, R = torch.linalg.qr(torch.randn(rows, cols, generator=gen, device=device))
    return Q * torch.where(torch.diagonal(R) >= 0, 1.0, -1.0)


def source_weight(spectrum: str, m: int, n: int, gen: torch.Generator, device: torch.device) -> tuple[torch.Tensor, float]:
    """A float32 ``m × n`` weight with the named spectrum, and its σ_1 (before the RMS scaling)."""
    k, d = subspace_rank(m, n), min(m, n)
    if spectrum == "gapped":
        Uk, Vk = _haar(m, k, gen, device), _haar(n, k, gen, device)
        tail = torch.randn(m, n, generator=gen, device=device) / (math.sqrt(m) + math.sqrt(n))
        tail -= Uk @ (Uk.T @ tail)
        tail -= (tail @ Vk) @ Vk.T
        s = torch.linspace(100.0, 10.0, k, device=device)
        return torch.addmm(tail, Uk * s, Vk.T), 100.0
    if spectrum == "powerlaw":
        U, V = _haar(m, d, gen, device), _haar(n, d, gen, device)
        s = torch.arange(1, d + 1, device=device, dtype=torch.float32).pow(-0.5)
        return (U * s) @ V.T, 1.0
    raise ValueError(f"unknown spectrum {spectrum!r}")


def manifest_for(scale: str, spectrum: str, modules: list[Module], weight_dtype: torch.dtype, rho: float, seed: int) -> dict:
    return {"format": FORMAT_VERSION, "scale": scale, "spectrum": spectrum, "weight_dtype": str(weight_dtype).removeprefix("torch."),
            "perturbation": rho, "seed": seed, "rms": RMS, "lora_rank": LORA_RANK, "lora_alpha": LORA_ALPHA,
            "modules": [[m.name, list(m.shape)] for m in modules]}


def is_generated(folder: Path, manifest: dict) -> bool:
    try:
        have = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    files = ("source.safetensors", "target.safetensors", "lora_a.safetensors", "lora_b.safetensors")
    return have == manifest and all((folder / f).exists() for f in files)


def generate(folder: Path, manifest: dict, modules: list[Module], device: torch.device, log=print) -> None:
    """Write source/target bases and the two LoRAs into ``folder`` (then ``manifest.json``)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").unlink(missing_ok=True)
    shutil.rmtree(folder / "exact64", ignore_errors=True)  # exact bases of the previous data
    wdt = getattr(torch, manifest["weight_dtype"])
    entries = [(m.weight_key, m.shape) for m in modules]
    src = StreamingSafetensors(folder / "source.safetensors", entries, wdt, {"prolora_bench": "source"})
    tgt = StreamingSafetensors(folder / "target.safetensors", entries, wdt, {"prolora_bench": "target"})
    loras: dict[str, dict[str, torch.Tensor]] = {"lora_a": {}, "lora_b": {}}
    seed = int(manifest["seed"])
    for i, mod in enumerate(modules):
        m, n = mod.shape
        gen = torch.Generator(device=device).manual_seed(seed * 100_003 + i)
        w, s1 = source_weight(manifest["spectrum"], m, n, gen, device)
        pert = torch.randn(m, n, generator=gen, device=device).mul_(manifest["perturbation"] * s1 / (math.sqrt(m) + math.sqrt(n)))
        c = RMS / float(w.square().mean().sqrt())
        src.write(mod.weight_key, w * c)
        tgt.write(mod.weight_key, (w + pert) * c)
        del w, pert
        for j, name in enumerate(loras):
            g = torch.Generator(device="cpu").manual_seed(seed * 7_919 + 2 * i + j + 1)
            loras[name][f"{mod.name}.lora_down.weight"] = torch.randn(LORA_RANK, n, generator=g) / math.sqrt(n)
            loras[name][f"{mod.name}.lora_up.weight"] = torch.randn(m, LORA_RANK, generator=g) * 0.01
            loras[name][f"{mod.name}.alpha"] = torch.tensor(LORA_ALPHA)
        if (i + 1) % max(1, len(modules) // 10) == 0 or i + 1 == len(modules):
            log(f"[bench] generated {i + 1}/{len(modules)} modules ({manifest['spectrum']})")
    src.close()
    tgt.close()
    for name, tensors in loras.items():
        save_file(tensors, str(folder / f"{name}.safetensors"), metadata={"ss_network_dim": str(LORA_RANK), "prolora_bench": name})
    (folder / "manifest.json").write_text(json.dumps(manifest))
