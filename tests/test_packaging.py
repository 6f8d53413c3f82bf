"""What a user installs: the registry metadata in pyproject.toml, the requirements (every one imported
by the pack, every import declared or provided by ComfyUI), and the archive ``comfy node publish``
builds (git-tracked files minus ``.comfyignore``, matched with git's own ignore rules)."""
from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Modules ComfyUI itself provides to every custom node (its own packages and its requirements).
HOST = {"torch", "comfy", "comfy_api", "comfy_extras", "folder_paths", "PIL"}
#: requirement name → import name, where they differ.
IMPORT_NAME = {"pillow": "PIL"}


def _requirements() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _name(req: str) -> str:
    for sep in ("<", ">", "=", "!", "~", "[", ";", " "):
        req = req.split(sep)[0]
    return req.strip().lower()


def _pack_imports() -> set[str]:
    found: set[str] = set()
    for path in [ROOT / "__init__.py", *(ROOT / "nodes").glob("*.py"), *(ROOT / "prolora_core").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {p.stem for p in ROOT.glob("*.py")}  # the pack's own top-level modules (prolora_host)


def test_registry_metadata() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    comfy = meta["tool"]["comfy"]
    for key in ("PublisherId", "DisplayName", "Icon", "requires-comfyui"):
        assert str(comfy.get(key, "")).strip(), f"[tool.comfy] {key} is empty"
    icon = comfy["Icon"]
    assert icon.startswith("https://") and (ROOT / icon.split("/main/", 1)[1]).is_file(), icon  # the icon is in the repository
    assert meta["project"]["version"] and meta["project"]["name"]
    assert sorted(map(_name, meta["project"]["dependencies"])) == sorted(map(_name, _requirements()))


def test_every_requirement_is_imported_and_every_import_is_declared() -> None:
    required = {IMPORT_NAME.get(_name(r), _name(r)) for r in _requirements()}
    imported = _pack_imports()
    assert required - imported == set(), f"required but never imported: {required - imported}"
    assert imported - required - HOST == set(), f"imported but not in requirements.txt: {imported - required - HOST}"


def test_markers_in_pyproject_are_used() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    names = [m.split(":")[0].strip() for m in meta["tool"]["pytest"]["ini_options"]["markers"]]
    text = "\n".join(p.read_text() for p in (ROOT / "tests").glob("*.py"))
    for name in names:
        assert f"pytest.mark.{name}" in text, f"marker {name!r} is declared but no test uses it"


def _published() -> set[str]:
    try:
        tracked = subprocess.run(["git", "ls-files", "-c"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\n")
        ignored = subprocess.run(["git", "ls-files", "-c", "-i", "--exclude-from=.comfyignore"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.fail(f"git is needed to list the published files: {e}")
    return {f for f in tracked if f} - {f for f in ignored if f}


def test_published_archive_keeps_what_users_need_and_leaves_dev_folders_out() -> None:
    shipped = _published()
    tracked_zoo = {f for f in subprocess.run(["git", "ls-files", "zoo"], cwd=ROOT, capture_output=True, text=True).stdout.split() if f}
    assert tracked_zoo and tracked_zoo <= shipped  # the demo nodes load these
    for need in ("__init__.py", "pyproject.toml", "requirements.txt", "README.md", "web/prolora.js", "nodes/extension.py"):
        assert need in shipped, need
    assert {f for f in shipped if f.startswith("web/docs/")}, "node docs"
    assert {f for f in shipped if f.startswith("example_workflows/") and f.endswith(".json")}
    assert all(f.startswith(("nodes/", "prolora_core/", "web/", "zoo/", "example_workflows/")) or "/" not in f for f in shipped), \
        sorted(f for f in shipped if "/" in f and not f.startswith(("nodes/", "prolora_core/", "web/", "zoo/", "example_workflows/")))
    for dev in ("tests/", "bench/", "evidence/", "scripts/", ".ci/"):
        assert not [f for f in shipped if f.startswith(dev)], dev
    # nothing shipped imports what is left out
    for f in shipped:
        if f.endswith(".py"):
            tree = ast.parse((ROOT / f).read_text())
            mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | \
                   {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            assert not {m for m in mods if m.split(".")[0] in ("tests", "bench", "evidence", "scripts")}, f
