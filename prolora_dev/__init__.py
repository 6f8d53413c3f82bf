"""Development support for the ProLoRA pack: what the tests, the evidence study, the benchmarks and
the scripts share, in one place. Nothing in the pack (``__init__.py``, ``nodes/``, ``prolora_core/``)
imports this package, and ``.comfyignore`` leaves it out of the published archive.

* :mod:`prolora_dev.host` — the ComfyUI host in ``.comfyui/``: ``configure_host()`` (ComfyUI first
  on ``sys.path``, the repo root last, CPU mode, no argv parsing) and ``load_pack()`` (the pack
  imported under its own name, the way ComfyUI imports a custom node).
* :mod:`prolora_dev.tiny_models` — tiny SD1.5/SDXL/Flux/Chroma models built from ComfyUI's own
  classes, and the tiny-model file format: one writer here, one reader (the pack's
  ``Load Tiny Model`` loader).
* :mod:`prolora_dev.server` — a real ComfyUI server in a subprocess (``main.py --cpu``) with the
  pack in its ``custom_nodes/``.

Run from the repo root (``python -m evidence.…``, ``python -m scripts.demo``, ``python -m pytest``):
the repo root is then importable, and :func:`prolora_dev.host.configure_host` orders ``sys.path``.
Importing this package itself changes nothing.
"""
