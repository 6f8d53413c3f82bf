"""The shipped tiny zoo's conventions (``zoo/``), in one place for the pack's demo nodes and for the
evidence study that builds the zoo (``python -m evidence.build_zoo``); see ``zoo/README.md``.

* Files: ``zoo/<name>.safetensors``; models in the tiny-model format (read by the pack's
  ``Load Tiny Model`` loader), LoRAs ``lora_<lora>_<model>``, the prompts' embeddings
  ``conditioning`` (``context`` ``[len(CLASSES) + 1, tokens, 32]``, the last row the empty prompt).
* The "latent" is the image: ``2·rgb − 1`` in channels 0–2 of an SD1.5-format latent, scaled by
  :data:`LATENT_SCALE` on the way in and out.
"""
from __future__ import annotations

from pathlib import Path

from .errors import ProLoRAError

ZOO_DIR = Path(__file__).resolve().parents[1] / "zoo"
#: The demo's model choices (shown name → zoo file stem); the first is the source.
MODELS = {"source": "source", "descendant, gentle fine-tune": "descendant_a_near", "descendant A, strong fine-tune": "descendant_a",
          "descendant B, pruned + distilled": "descendant_b", "turbo, 4-step student": "turbo", "unrelated C": "unrelated_c"}
#: Targets no LoRA was trained on (people train on the base and run on the turbo): the demo's
#: "trained on target" output is the source's LoRA for them, i.e. what those users load.
UNTRAINED = frozenset({"turbo"})
#: The LoRAs trained on the zoo's models (``lora_<name>_<model>.safetensors``).
LORAS = ("style", "concept")
#: The prompts, in the order of ``conditioning.safetensors``' rows (the empty prompt follows them).
CLASSES = ("disc", "square", "bar", "red ring")
#: ``comfy.latent_formats.SD15.scale_factor``: the zoo models use SD1.5's latent format.
LATENT_SCALE = 0.18215


def zoo_file(name: str) -> Path:
    """``zoo/<name>.safetensors``; ProLoRAError naming the file when it is missing."""
    path = ZOO_DIR / f"{name}.safetensors"
    if not path.is_file():
        raise ProLoRAError("demo zoo file is missing (rebuild it with `python -m evidence.build_zoo`)", file=path)
    return path
