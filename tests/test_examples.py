"""The example workflows as users get them: the shipped UI files are what the builder makes, each
runnable example runs in a real browser against a real server and its panels show that run's
values, the real-checkpoint example runs with the tiny models swapped in, and the demo command
produces its pictures."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
from PIL import Image
from safetensors.torch import save_file

import comfy_host
from browser_host import drive
from scripts import workflows

pytestmark = pytest.mark.server
EXAMPLES = comfy_host.REPO_ROOT / "example_workflows"


@pytest.fixture(scope="module")
def server(comfyui: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[comfy_host.ComfyServer]:
    """A real server whose models/ holds tiny stand-ins for the real-checkpoint example."""
    base = comfy_host.prepare_base_dir(tmp_path_factory.mktemp("examples_base"))
    src = comfy_host.save_tiny_pair(base / "models", target_seed=21)
    lora = comfy_host.kohya_lora(src, ["input_blocks.1.1.transformer_blocks.0.attn1.to_q", "middle_block.1.transformer_blocks.0.attn2.to_v"],
                                 scale=1.0, seed=22)
    save_file(lora, str(base / "models" / "loras" / "tiny_lora.safetensors"), metadata={"ss_output_name": "tiny"})
    server = comfy_host.start_comfy_server(base)
    server.http.post(server.url + "/settings", json={"Comfy.TutorialCompleted": True}, timeout=10).raise_for_status()
    yield server
    server.stop()


def test_shipped_ui_files_are_what_the_builder_makes(server: comfy_host.ComfyServer) -> None:
    info = server.object_info()
    for name, make in workflows.ALL.items():
        shipped = json.loads((EXAMPLES / f"{name}.json").read_text())
        assert shipped == make().ui(info), f"example_workflows/{name}.json is stale: run scripts/demo.sh --write-workflows"
        thumb = EXAMPLES / f"{name}.jpg"
        with Image.open(thumb) as im:
            assert im.format == "JPEG" and min(im.size) >= 128, thumb
        for node in shipped["nodes"]:
            assert node["type"] in info, f"{name}: unknown node {node['type']}"


def test_real_checkpoint_example_runs_with_the_tiny_models_swapped_in(server: comfy_host.ComfyServer) -> None:
    graph = workflows.real_checkpoints("tiny_src.safetensors", "tiny_tgt.safetensors", "tiny_lora.safetensors", loader="ProLoRATinyModelLoader")
    entry = server.run(graph.api(), timeout=300)
    saved = [o for o in entry["outputs"].values() if "text" in o]
    assert saved and "prolora/transferred_to_target" in saved[0]["text"][0]
    out = server.base_dir / "models" / "loras" / "prolora" / "transferred_to_target.safetensors"
    import safetensors

    with safetensors.safe_open(str(out), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert all(k.startswith("lora_unet_") for k in keys) and meta["ss_output_name"] == "tiny"  # kohya in, kohya out; metadata kept
    assert meta["prolora.pairing"] == "similarity" and meta["prolora.source_base"] == "tiny_src.safetensors"


@pytest.mark.parametrize("name", list(workflows.RUNNABLE))
def test_runnable_example_runs_in_the_browser_as_shipped(server: comfy_host.ComfyServer, tmp_path: Path, name: str) -> None:
    shipped = json.loads((EXAMPLES / f"{name}.json").read_text())
    n_match = sum(n["type"] == "ProLoRAMatchModules" for n in shipped["nodes"])
    result = drive(server, shipped, tmp_path, prompt_timeout_s=480, match_panels=n_match)
    entry = server.wait(result["prompt_id"], timeout=30)
    assert result["status"] == "success" == entry["status"]["status_str"], entry["status"]
    ours = [e for e in result["page_errors"] + result["console_errors"] if "prolora" in e.lower() and "api.comfy.org" not in e]
    assert not ours, ours
    panels = result["match_panels"]
    assert len(panels) == n_match
    for node_id, panel in panels.items():
        report = entry["outputs"][node_id]["prolora_match"][0]
        assert (int(panel["passing"]), int(panel["modules"]), float(panel["threshold"])) == (report["passing"], report["modules"], report["threshold"])
    saved = [img for o in entry["outputs"].values() for img in o.get("images", []) if img.get("type") == "output"]
    assert saved, "the example saves its grid"
    shot = Path(result["screenshots"]["page"])
    shot.rename(shot.with_name(f"example_{name}.png"))


def test_demo_command_writes_the_grid_and_the_report(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(["bash", str(comfy_host.REPO_ROOT / "scripts" / "demo.sh"), "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert str(out / "grid.png") in proc.stdout and str(out / "report.png") in proc.stdout
    with Image.open(out / "grid.png") as grid, Image.open(out / "report.png") as report:
        assert grid.size[0] >= 6 * 128 and report.size == (1400, 1000)
