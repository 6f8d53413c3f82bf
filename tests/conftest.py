"""Pytest set-up that lets the tests drive the real ComfyUI host in ``.comfyui/``.

Import order matters, so this file does its work at import time, before any test
module is collected:

* ``pyproject.toml`` puts the repo root and ``tests/`` on ``sys.path`` (pytest's
  ``pythonpath`` option), so ``prolora_dev``, ``prolora_core`` and the test helpers
  (``comfy_host``, ``reference``, ...) import under ``--import-mode=importlib``.
* ``prolora_dev.host.configure_host()`` then puts ``.comfyui/`` first on ``sys.path``
  (ComfyUI's top-level ``nodes``, ``utils``, ``server``, ``comfy*`` must win over the
  pack's own ``nodes/`` package), moves the repo root to the end, switches ComfyUI's
  argument parsing off (``comfy.cli_args`` would parse pytest's argv) and sets
  ``args.cpu`` before anything imports ``comfy.model_management``.
* torch runs one intra-op thread (``PROLORA_TEST_THREADS`` overrides), in-process
  and in the server subprocess.

When ``.comfyui/main.py`` is missing nothing ComfyUI-related is touched here; the
fixtures below (and every helper in ``comfy_host``) then fail with a message that
says to run ``scripts/setup.sh``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from prolora_dev import host

REPO_ROOT = host.REPO_ROOT


def _configure_host() -> None:
    """ComfyUI first and the repo root last on ``sys.path``, CPU mode, no argv parsing
    (``prolora_dev.host.configure_host``, the same set-up the evidence scripts and the demo use)."""
    if "comfy.model_management" in sys.modules:
        raise RuntimeError("comfy.model_management was imported before tests/conftest.py could set args.cpu")
    host.configure_host()


def _configure_torch_threads() -> None:
    """One intra-op thread by default (``PROLORA_TEST_THREADS`` overrides).

    On a small shared machine OpenMP threads that spin while another process holds the
    cores made a tiny sampling step 30-40x slower (0.3 s -> 12 s); one thread avoids that.
    """
    import torch

    threads = int(os.environ.get("PROLORA_TEST_THREADS", "1"))
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by subprocesses (the ComfyUI server)


_configure_torch_threads()
COMFYUI_AVAILABLE = host.host_files_present()
if COMFYUI_AVAILABLE:
    _configure_host()

import comfy_host  # after the host set-up, as every test module

if TYPE_CHECKING:
    from comfy.model_patcher import ModelPatcher
    from comfy.sd import CLIP


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep pytest from importing the repo root's ``__init__.py``.

    The root has an ``__init__.py`` (it is the ComfyUI pack), so pytest collects it as a
    ``Package`` whose ``setup()`` imports the whole pack as a module named after the
    checkout directory (e.g. ``main``), for every test run: a second copy of the pack
    and of ``prolora_core``, and a pack import error would break unrelated tests. The
    pack is tested through ``comfy_host.load_pack()`` and the real server instead.
    """
    for item in items:
        for node in item.listchain():
            if isinstance(node, pytest.Package) and node.path.resolve() == REPO_ROOT:
                node.setup = lambda: None  # type: ignore[method-assign]  # no setUpModule in the pack


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    """Attach the server log tail to the report of a failing test that used ``comfy_server``."""
    report: pytest.TestReport = yield
    server = item.session.stash.get(_SERVER_KEY, None)
    if report.failed and server is not None and "comfy_server" in getattr(item, "fixturenames", ()):
        report.sections.append(("ComfyUI server log (tail)", server.log_tail()))
        item.session.stash[_LOG_SHOWN_KEY] = True
    return report


_SERVER_KEY = pytest.StashKey["comfy_host.ComfyServer"]()
_LOG_SHOWN_KEY = pytest.StashKey[bool]()


@pytest.fixture(scope="session")
def comfyui() -> Any:
    """The real ComfyUI ``nodes`` module, imported in-process (fails if the host is not set up)."""
    comfy_host.require_comfyui()
    import nodes

    return nodes


@pytest.fixture()
def comfy_dirs(comfyui: Any, tmp_path: Path) -> Iterator[Path]:
    """Point ComfyUI's in-process output/temp/input folders at ``tmp_path`` for one test."""
    import folder_paths

    saved = (folder_paths.get_output_directory(), folder_paths.get_temp_directory(), folder_paths.get_input_directory())
    for name, setter in (("output", folder_paths.set_output_directory), ("temp", folder_paths.set_temp_directory),
                         ("input", folder_paths.set_input_directory)):
        (tmp_path / name).mkdir(exist_ok=True)
        setter(str(tmp_path / name))
    try:
        yield tmp_path
    finally:
        folder_paths.set_output_directory(saved[0])
        folder_paths.set_temp_directory(saved[1])
        folder_paths.set_input_directory(saved[2])


@pytest.fixture()
def tiny_sd15(comfyui: Any) -> ModelPatcher:
    """A fresh tiny SD1.5-shaped ``MODEL`` (seed 0)."""
    return comfy_host.tiny_sd15_model(0)


@pytest.fixture()
def tiny_sdxl(comfyui: Any) -> ModelPatcher:
    """A fresh tiny SDXL-shaped ``MODEL`` (seed 0)."""
    return comfy_host.tiny_sdxl_model(0)


@pytest.fixture()
def tiny_clip(comfyui: Any) -> CLIP:
    """A fresh tiny SD1.5-style ``CLIP`` (clip_l layout, seed 0)."""
    return comfy_host.tiny_clip(0)


@pytest.fixture(scope="session")
def comfy_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[comfy_host.ComfyServer]:
    """A real ComfyUI server (``main.py --cpu``) on a free loopback port, with our pack in custom_nodes/.

    Shared by the whole session: tests must not rely on a clean queue/history, only on
    their own prompt ids.
    """
    comfy_host.require_comfyui()
    base_dir = tmp_path_factory.mktemp("comfy_base")
    server = comfy_host.start_comfy_server(base_dir)
    request.session.stash[_SERVER_KEY] = server
    try:
        yield server
    finally:
        server.stop()
        if request.session.testsfailed and not request.session.stash.get(_LOG_SHOWN_KEY, False):
            reporter = request.config.pluginmanager.get_plugin("terminalreporter")
            if reporter is not None:
                reporter.write_line(f"\n--- ComfyUI server log tail ({server.log_path}) ---\n{server.log_tail()}")


@pytest.fixture(scope="session")
def pack(comfyui: Any) -> Any:
    """The node pack, imported the way ComfyUI imports it."""
    return comfy_host.load_pack()


@pytest.fixture(scope="session")
def nodes_by_id(pack: Any) -> dict[str, Any]:
    """The pack's V3 node classes by node id, from its ``comfy_entrypoint``."""
    import asyncio

    ext = asyncio.run(pack.comfy_entrypoint())
    return {n.define_schema().node_id: n for n in asyncio.run(ext.get_node_list())}
