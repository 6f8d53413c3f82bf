"""Evidence for the ProLoRA defaults: a tiny model zoo trained with ComfyUI's own UNet, and the
transfer protocol run on it (``python -m evidence.build_zoo``, ``python -m evidence.protocol``).

Importing this package fixes ``sys.path`` and ComfyUI's global settings, because the order of
imports matters and ``python -m`` from the repo root puts the repo root (``''``) at ``sys.path[0]``:

* ``.comfyui/`` goes first: ComfyUI's top-level ``nodes`` module must win over this pack's own
  ``nodes/`` package (same name). The repo root moves to the END, so ``prolora_core`` and
  ``evidence`` still import. When ComfyUI itself already runs (this package imported from the
  pack inside a stock ComfyUI), ``comfy`` is already imported and nothing is changed.
* ComfyUI's argument parsing is switched off and ``args.cpu`` set before anything imports
  ``comfy.model_management`` (only when this package is the one configuring ComfyUI).

Set ``PROLORA_COMFYUI_DIR`` to use a ComfyUI other than ``<repo>/.comfyui``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
COMFYUI_DIR = Path(os.environ.get("PROLORA_COMFYUI_DIR", REPO_ROOT / ".comfyui")).resolve()
ZOO_DIR = REPO_ROOT / "zoo"
EVIDENCE_DIR = REPO_ROOT / "evidence"


def _same_dir(entry: str, target: Path) -> bool:
    try:
        return Path(entry or os.getcwd()).resolve() == target
    except OSError:
        return False


def configure_host() -> None:
    """Put ComfyUI first and the repo root last on ``sys.path``; CPU mode, no argv parsing.

    A no-op when ComfyUI is already running in this process (``comfy.model_management`` imported).
    """
    if "comfy.model_management" in sys.modules:
        return
    if not (COMFYUI_DIR / "comfy").is_dir():
        raise RuntimeError(f"ComfyUI not found in {COMFYUI_DIR}: run scripts/setup.sh or set PROLORA_COMFYUI_DIR")
    sys.path[:] = [p for p in sys.path if not _same_dir(p, REPO_ROOT) and not _same_dir(p, COMFYUI_DIR)]
    sys.path.insert(0, str(COMFYUI_DIR))
    sys.path.append(str(REPO_ROOT))
    stale = sys.modules.get("nodes")
    if stale is not None and Path(getattr(stale, "__file__", "") or "").resolve().parent == REPO_ROOT / "nodes":
        del sys.modules["nodes"]  # the pack's nodes/ package, imported by mistake: let ComfyUI's win
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    args.cpu = True
    args.disable_api_nodes = True


configure_host()
