"""The source LoRAs trained again with other training seeds (spread over LoRA training, issue 12).

    cd <repo> && nice -n 10 .venv/bin/python -m evidence.lora_seeds style 1 /tmp/i6/zoo_seed1   # one LoRA, one seed

Writes ``<dir>/lora_<lora>_source.safetensors`` trained by :func:`evidence.build_zoo.train_lora` with
``seed`` (its init and data stream shifted; seed 0 is the shipped file) and links every other file
of the shipped zoo into ``<dir>``, so ``<dir>`` is a zoo that differs from the shipped one only in
that LoRA. The trained-on-target LoRAs (the "1" end of gap closed) stay the shipped ones (seed 0).
Evaluate with ``AUTO_ZOO=<dir> python -m evidence.auto_trial protocol|turbo <lora>``.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from . import ZOO_DIR, configure_host

configure_host()

import safetensors.torch  # noqa: E402

from .build_zoo import LORA_ALPHA, LORA_RANK, Recipe, train_lora  # noqa: E402
from .models import load_zoo_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    lora, seed, out = (sys.argv[1:] if argv is None else argv)[:3]
    torch.set_num_threads(1)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"lora_{lora}_source"
    for f in ZOO_DIR.iterdir():
        link = out_dir / f.name
        if f.suffix == ".safetensors" and f.name != f"{name}.safetensors" and not link.exists():
            link.symlink_to(f.resolve())
    r = Recipe()
    steps, lr = (r.style_lora_steps, r.style_lora_lr) if lora == "style" else (r.lora_steps, r.lora_lr)
    t0 = time.time()
    tensors, losses = train_lora(load_zoo_model(ZOO_DIR / "source.safetensors"), lora, steps, lr, name, seed=int(seed))
    path = out_dir / f"{name}.safetensors"
    tmp = path.with_suffix(".tmp")
    safetensors.torch.save_file(tensors, str(tmp), metadata={
        "ss_network_dim": str(LORA_RANK), "ss_network_alpha": str(LORA_ALPHA), "prolora.zoo.base": "source",
        "prolora.zoo.data": lora, "prolora.zoo.train_seed": str(seed),
        "prolora.zoo.final_loss": f"{sum(losses[-50:]) / len(losses[-50:]):.5f}"})
    tmp.replace(path)
    print(f"{path}: {steps} steps in {time.time() - t0:.0f} s, final loss {sum(losses[-50:]) / len(losses[-50:]):.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
