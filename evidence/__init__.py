"""Evidence for the ProLoRA defaults: a tiny model zoo trained with ComfyUI's own UNet, and the
transfer protocol run on it (``python -m evidence.build_zoo``, ``python -m evidence.protocol``).

Importing this package configures the ComfyUI host (``prolora_dev.host.configure_host``: ComfyUI
first on ``sys.path`` so its top-level ``nodes`` wins over the pack's ``nodes/`` package, the repo
root last, CPU mode, no argv parsing), because ``python -m`` from the repo root puts the repo root
first and the order of imports matters. When ComfyUI already runs in the process (the tests, or a
real ComfyUI) nothing is changed. Set ``PROLORA_COMFYUI_DIR`` to use a ComfyUI other than
``<repo>/.comfyui``.
"""
from __future__ import annotations

from prolora_core.zoo import ZOO_DIR  # re-exported: the evidence scripts' default zoo
from prolora_dev.host import COMFYUI_DIR, REPO_ROOT, configure_host  # COMFYUI_DIR re-exported too

EVIDENCE_DIR = REPO_ROOT / "evidence"

configure_host()
