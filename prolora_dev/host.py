"""The ComfyUI host in ``.comfyui/`` for development processes (tests, evidence, benchmarks, scripts).

**Why ``sys.path`` is ordered here, and only here.** ComfyUI's own top-level modules (``nodes``,
``utils``, ``server``, ``app``, ``execution``, ``folder_paths``, ``comfy*``) are plain top-level
names, and the pack keeps a ``nodes/`` package at its root. A process that runs from the repo root
(``python -m …`` puts the repo root first on ``sys.path``) would import the pack's ``nodes/`` where
ComfyUI means its ``nodes.py``. :func:`configure_host` therefore puts ComfyUI first and moves the
repo root to the END: ``import nodes`` is ComfyUI's, ``import prolora_core`` / ``evidence`` /
``prolora_dev`` still work. The pack itself is never imported as top-level ``nodes``: it is loaded
by file path under its own package name (:func:`load_pack`), exactly as ComfyUI's
``nodes.load_custom_node`` does, and its modules use relative imports only.

ComfyUI's argument parsing is switched off (``comfy.cli_args`` would parse the caller's argv) and
``args.cpu`` set before anything imports ``comfy.model_management``.

Set ``PROLORA_COMFYUI_DIR`` to use a ComfyUI other than ``<repo>/.comfyui``.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[1]
COMFYUI_DIR = Path(os.environ.get("PROLORA_COMFYUI_DIR", REPO_ROOT / ".comfyui")).absolute()
PACK_DIR_NAME = "comfyui-prolora"
SETUP_HINT = (
    f"The ComfyUI host is not set up ({COMFYUI_DIR / 'main.py'} is missing). "
    "Run scripts/setup.sh first: it creates .venv/ and unpacks ComfyUI 0.3.75 into .comfyui/."
)


class HostNotReady(RuntimeError):
    """The ComfyUI host is missing (``scripts/setup.sh`` not run) or was configured too late."""


def host_files_present() -> bool:
    """Whether ``.comfyui/main.py`` exists."""
    return (COMFYUI_DIR / "main.py").is_file()


def require_host_files() -> None:
    """Raise :class:`HostNotReady` (with the set-up hint) when the ComfyUI host is not set up."""
    if not host_files_present():
        raise HostNotReady(SETUP_HINT)


def _same_dir(entry: str, target: Path) -> bool:
    try:
        return Path(entry or os.getcwd()).resolve() == target.resolve()
    except OSError:
        return False


def configure_host() -> None:
    """Put ComfyUI first and the repo root last on ``sys.path``; CPU mode, no argv parsing.

    A no-op when ComfyUI already runs in this process (``comfy.model_management`` imported: either
    this ran before, or the caller lives inside a real ComfyUI). Raises :class:`HostNotReady` when
    ``.comfyui/comfy`` does not exist.
    """
    if "comfy.model_management" in sys.modules:
        return
    if not (COMFYUI_DIR / "comfy").is_dir():
        raise HostNotReady(f"ComfyUI not found in {COMFYUI_DIR}: run scripts/setup.sh or set PROLORA_COMFYUI_DIR")
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


def comfy_module_name(pack_dir: Path) -> str:
    """The ``sys.modules`` name ComfyUI gives a custom-node directory (``nodes.load_custom_node``)."""
    return str(pack_dir).replace(".", "_x_")


def load_pack(root: Path = REPO_ROOT, module_name: str | None = None, *, reload: bool = False) -> ModuleType:
    """Import the node pack at ``root`` the way ComfyUI does and return the package module.

    ComfyUI calls ``spec_from_file_location(<dir path with '.'→'_x_'>, <dir>/__init__.py)``,
    registers the module in ``sys.modules`` and executes it; the pack's relative imports then
    resolve below that name, so its ``nodes/`` package is ``<name>.nodes`` and never clashes with
    ComfyUI's top-level ``nodes``. ``module_name`` defaults to that same scheme. A pack already
    imported under the name is returned as is unless ``reload`` is true. Call
    :func:`configure_host` first (the pack imports ComfyUI modules).
    """
    name = module_name or comfy_module_name(root)
    if not reload and name in sys.modules:
        return sys.modules[name]
    init = root / "__init__.py"
    if not init.is_file():
        raise FileNotFoundError(f"{init} does not exist: nothing to load as a ComfyUI node pack")
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(root)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    for sub in [m for m in sys.modules if m.startswith(name + ".")]:
        del sys.modules[sub]  # a reload must not reuse stale submodules
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def pack_module(relative: str) -> ModuleType:
    """A module of this repo's pack, e.g. ``pack_module("nodes.tiny_model_node")`` (loads the pack first)."""
    return importlib.import_module(f"{load_pack().__name__}.{relative}")
