"""Real safetensors files for the CLI, cache and bad-input tests: small base pairs, LoRAs in every
input format, readers for the outputs, and helpers to run the CLI in-process or as a subprocess.

Bases: ``<module>.weight`` with decaying spectra (σ_i = 2·0.7^i, so the top-k subspaces are well
defined); the target is the source plus a small perturbation, or an unrelated weight with the same
spectrum. Four modules cover a wide linear, a tall linear, a 3×3 conv and a 1×1 conv.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from reference import phi, reference_transfer, top_bases

REPO_ROOT = Path(__file__).resolve().parents[1]

#: module name → base weight shape
MODULES: dict[str, tuple[int, ...]] = {
    "blocks.0.attn.to_q": (24, 40),  # linear, wide
    "blocks.0.ff.net": (40, 24),  # linear, tall
    "blocks.1.conv": (12, 6, 3, 3),  # conv 3×3 (12 × 54)
    "blocks.1.skip": (16, 12, 1, 1),  # conv 1×1 (16 × 12)
}
#: module name → LoRA rank
RANKS: dict[str, int] = {"blocks.0.attn.to_q": 3, "blocks.0.ff.net": 3, "blocks.1.conv": 2, "blocks.1.skip": 2}
FORMATS = ("kohya", "underscore", "native", "model-native", "unet", "peft")
UP_DOWN = {"peft": (".lora_B.weight", ".lora_A.weight")}


def matrix(w: np.ndarray) -> np.ndarray:
    return np.asarray(w, dtype=np.float64).reshape(w.shape[0], -1)


def decaying_weight(rng: np.random.Generator, shape: tuple[int, ...], rate: float = 0.7) -> np.ndarray:
    """A float32 weight of ``shape`` whose singular values decay geometrically (distinct, no ties)."""
    m, n = shape[0], int(np.prod(shape[1:]))
    d = min(m, n)
    U, _ = np.linalg.qr(rng.standard_normal((m, d)))
    V, _ = np.linalg.qr(rng.standard_normal((n, d)))
    s = 2.0 * rate ** np.arange(d)
    return ((U * s) @ V.T).reshape(shape).astype(np.float32)


@dataclass
class Bases:
    """A written source/target pair and the float32 weights in them (keyed by bare module name)."""

    source: Path
    target: Path
    ws: dict[str, np.ndarray]
    wt: dict[str, np.ndarray]


def write_base(path: Path, weights: Mapping[str, np.ndarray], prefix: str = "") -> Path:
    """``<prefix><module>.weight`` for each weight, plus a bias per module and one stray 1-D key."""
    tensors: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        tensors[f"{prefix}{name}.weight"] = torch.from_numpy(np.ascontiguousarray(w))
        tensors[f"{prefix}{name}.bias"] = torch.zeros(w.shape[0])
    tensors[f"{prefix}norm_out.weight"] = torch.ones(8)
    save_file(tensors, str(path))
    return path


def make_bases(
    folder: Path,
    *,
    seed: int = 0,
    noise: float = 0.01,
    unrelated: Iterable[str] = (),
    modules: Mapping[str, tuple[int, ...]] = MODULES,
    prefix: str = "",
    target_prefix: str | None = None,
    names: tuple[str, str] = ("source.safetensors", "target.safetensors"),
) -> Bases:
    """A source base and a related target (source + ``noise``·N(0, 1)); ``unrelated`` modules of the
    target are drawn independently (same spectrum, other subspaces)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ws = {name: decaying_weight(rng, shape) for name, shape in modules.items()}
    wt: dict[str, np.ndarray] = {}
    skip = set(unrelated)
    for name, w in ws.items():
        if name in skip:
            wt[name] = decaying_weight(rng, w.shape)
        else:
            wt[name] = (w + noise * rng.standard_normal(w.shape)).astype(np.float32)
    src = write_base(folder / names[0], ws, prefix)
    tgt = write_base(folder / names[1], wt, prefix if target_prefix is None else target_prefix)
    return Bases(src, tgt, ws, wt)


@dataclass
class Update:
    """One LoRA module's factors as stored (module shape: conv factors stay 4-D)."""

    up: np.ndarray
    down: np.ndarray
    alpha: float | None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def dense(self) -> np.ndarray:
        """``alpha / r · up @ down`` as an ``m × n`` float64 matrix."""
        scale = 1.0 if self.alpha is None else self.alpha / self.rank
        return scale * matrix(self.up).reshape(self.up.shape[0], self.rank) @ matrix(self.down)


def make_updates(
    seed: int = 1,
    modules: Mapping[str, tuple[int, ...]] = MODULES,
    ranks: Mapping[str, int] = RANKS,
    alpha: float | None = 2.0,
    dtype: type = np.float32,
) -> dict[str, Update]:
    """Random LoRA factors per module (LoCon shapes for conv modules)."""
    rng = np.random.default_rng(seed)
    out: dict[str, Update] = {}
    for name, shape in modules.items():
        r = ranks.get(name, 2)
        if len(shape) == 4:
            up = rng.standard_normal((shape[0], r, 1, 1))
            down = rng.standard_normal((r, *shape[1:]))
        else:
            up = rng.standard_normal((shape[0], r))
            down = rng.standard_normal((r, shape[1]))
        out[name] = Update((0.1 * up).astype(dtype), (0.1 * down).astype(dtype), alpha)
    return out


def lora_name(module: str, fmt: str) -> str:
    """The module's name as a LoRA of format ``fmt`` spells it."""
    return {
        "kohya": module,
        "underscore": "lora_unet_" + module.replace(".", "_"),
        "native": "diffusion_model." + module,
        "model-native": "model.diffusion_model." + module,
        "unet": "unet." + module,
        "peft": "base_model.model." + module,
    }[fmt]


def lora_tensors(updates: Mapping[str, Update], fmt: str = "kohya") -> dict[str, torch.Tensor]:
    up_s, down_s = UP_DOWN.get(fmt, (".lora_up.weight", ".lora_down.weight"))
    tensors: dict[str, torch.Tensor] = {}
    for module, u in updates.items():
        name = lora_name(module, fmt)
        tensors[name + up_s] = torch.from_numpy(np.array(u.up))
        tensors[name + down_s] = torch.from_numpy(np.array(u.down))
        if u.alpha is not None:
            tensors[name + ".alpha"] = torch.tensor(float(u.alpha), dtype=torch.float32)
    return tensors


def write_lora(path: Path, updates: Mapping[str, Update], fmt: str = "kohya", metadata: dict[str, str] | None = None,
               extra: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write ``updates`` in LoRA format ``fmt`` (``extra`` tensors added as they are)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = lora_tensors(updates, fmt)
    tensors.update(extra or {})
    save_file(tensors, str(path), metadata=metadata)
    return path


@dataclass
class OutModule:
    up: torch.Tensor
    down: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def dense(self) -> np.ndarray:
        """``alpha / rank(rows of down) · up @ down``, exactly as ComfyUI applies it."""
        up = self.up.double().reshape(self.up.shape[0], self.rank).numpy()
        return self.alpha / self.rank * up @ self.down.double().reshape(self.rank, -1).numpy()


def read_output(path: Path) -> dict[str, OutModule]:
    """A kohya-dotted output, checked to hold exactly ``lora_up``/``lora_down``/``alpha`` per module."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    names = sorted(k.removesuffix(".lora_up.weight") for k in tensors if k.endswith(".lora_up.weight"))
    expected = {f"{n}{s}" for n in names for s in (".lora_up.weight", ".lora_down.weight", ".alpha")}
    assert set(tensors) == expected, f"unexpected keys in {path.name}: {sorted(set(tensors) ^ expected)}"
    return {n: OutModule(tensors[f"{n}.lora_up.weight"], tensors[f"{n}.lora_down.weight"], float(tensors[f"{n}.alpha"])) for n in names}


def read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def expected_dense(update: Update, ws: np.ndarray, wt: np.ndarray, k: int, mode: str) -> np.ndarray:
    """tests/reference.py's dense float64 result for one module."""
    return reference_transfer(update.dense(), matrix(ws), matrix(wt), k, mode)


def expected_phi(ws: np.ndarray, wt: np.ndarray, k: int) -> tuple[float, float]:
    Us, Vs = top_bases(ws, k)
    Ut, Vt = top_bases(wt, k)
    return phi(Us, Ut), phi(Vs, Vt)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), 1e-300))


def files_under(folder: Path) -> dict[str, int]:
    """Every file below ``folder`` (hidden and temporary ones included) with its size."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def run_main(argv: Sequence[str | Path], capsys) -> tuple[int, str, str]:  # noqa: ANN001 (pytest's CaptureFixture)
    """``prolora_core.cli.main(argv)`` in this process: ``(exit code, stdout, stderr)``."""
    from prolora_core.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def run_cli(argv: Sequence[str | Path], cache_dir: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m prolora_core <argv>`` as a real subprocess, run from the repository root."""
    env = dict(os.environ)
    if cache_dir is not None:
        env["PROLORA_CACHE_DIR"] = str(cache_dir)
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-m", "prolora_core", *map(str, argv)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def read_report(path: Path) -> dict:
    return json.loads(path.read_text())
