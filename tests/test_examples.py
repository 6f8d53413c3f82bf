"""The example workflows as users get them: the shipped UI files are what the builder makes (laid out
in titled groups, each with a note), each runnable example runs in a real browser against a real
server and its panels show that run's values, the examples shipped with real checkpoint names
(SDXL → SSD-1B, Flux.1-dev → Krea/Chroma, Wan 2.1 → both Wan 2.2 experts) run with tiny models of
the same classes swapped in, and the demo command produces its pictures."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import comfy_host
import family_models
from browser_host import drive
from scripts import workflows

pytestmark = pytest.mark.server
EXAMPLES = comfy_host.REPO_ROOT / "example_workflows"
#: Modules of the tiny Flux the example's LoRA touches (kohya names): fused qkv and linear1, an MLP
#: layer, and two modulation layers that Chroma lacks.
FLUX_MODULES = ["double_blocks.0.img_attn.qkv", "double_blocks.0.txt_mlp.0", "single_blocks.0.linear1", "double_blocks.0.img_mod.lin",
                "single_blocks.0.modulation.lin"]
FLUX_MODULATION = {"lora_unet_double_blocks_0_img_mod_lin", "lora_unet_single_blocks_0_modulation_lin"}
#: Modules of the tiny Wan 2.1 14B the example's LoRA touches (musubi-tuner names).
WAN_MODULES = ["blocks.0.self_attn.q", "blocks.0.cross_attn.k", "blocks.1.self_attn.o", "blocks.1.ffn.0"]


@pytest.fixture(scope="module")
def server(comfyui: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[comfy_host.ComfyServer]:
    """A real server whose models/ holds tiny stand-ins for the real-checkpoint example."""
    base = comfy_host.prepare_base_dir(tmp_path_factory.mktemp("examples_base"))
    src = comfy_host.save_tiny_pair(base / "models", target_seed=21)
    lora = comfy_host.kohya_lora(src, ["input_blocks.1.1.transformer_blocks.0.attn1.to_q", "middle_block.1.transformer_blocks.0.attn2.to_v"],
                                 scale=1.0, seed=22)
    save_file(lora, str(base / "models" / "loras" / "tiny_lora.safetensors"), metadata={"ss_output_name": "tiny"})
    models = base / "models" / "diffusion_models"
    flux = comfy_host.tiny_flux_model(0)  # Flux.1-dev; Krea-dev: a fine-tune of it; Chroma: no modulation layers
    for name, model in (("tiny_flux_dev", flux), ("tiny_flux_krea", comfy_host.perturbed_copy(flux, 0.05, seed=31)),
                        ("tiny_chroma", comfy_host.tiny_chroma_from(flux, 0.05, seed=32))):
        comfy_host.save_model_state(model, models / f"{name}.safetensors")
    save_file(comfy_host.kohya_lora(flux, FLUX_MODULES, seed=33), str(base / "models" / "loras" / "tiny_flux_lora.safetensors"))
    wan21 = family_models.tiny_model("wan21_14b", 0)
    high, low = family_models.wan22_experts_from(wan21)
    for name, model in (("tiny_wan21", wan21), ("tiny_wan22_high", high), ("tiny_wan22_low", low)):
        comfy_host.save_model_state(model, models / f"{name}.safetensors")
    save_file(comfy_host.kohya_lora(wan21, WAN_MODULES, seed=34), str(base / "models" / "loras" / "tiny_wan_lora.safetensors"))
    server = comfy_host.start_comfy_server(base)
    server.http.post(server.url + "/settings", json={"Comfy.TutorialCompleted": True}, timeout=10).raise_for_status()
    yield server
    server.stop()


def test_shipped_ui_files_are_what_the_builder_makes(server: comfy_host.ComfyServer) -> None:
    info = server.object_info()
    assert set(workflows.ALL) == {p.stem for p in EXAMPLES.glob("*.json")}, "every shipped workflow is built by scripts/workflows.py"
    for name, make in workflows.ALL.items():
        shipped = json.loads((EXAMPLES / f"{name}.json").read_text())
        assert shipped == make().ui(info), f"example_workflows/{name}.json is stale: run scripts/demo.sh --write-workflows"
        thumb = EXAMPLES / f"{name}.jpg"
        with Image.open(thumb) as im:
            assert im.format == "JPEG" and min(im.size) >= 128, thumb
        for node in shipped["nodes"]:
            assert node["type"] in info or node["type"] in workflows.VIRTUAL, f"{name}: unknown node {node['type']}"


def _inside(box: list[float], node: dict[str, Any]) -> bool:
    """Whether the node, title bar included (30 px above ``pos``), lies inside the group's box."""
    (x, y, w, h), (nx, ny), (nw, nh) = box, node["pos"], node["size"]
    return x <= nx and y <= ny - 30 and nx + nw <= x + w and ny + nh <= y + h


@pytest.mark.parametrize("name", list(workflows.ALL))
def test_shipped_workflows_are_laid_out_in_titled_groups_with_a_note(name: str) -> None:
    """Every node sits in exactly one titled group, every group opens with a note, no two boxes
    overlap, and the file opens at a zoom where the text is read as is."""
    shipped = json.loads((EXAMPLES / f"{name}.json").read_text())
    groups, nodes = shipped["groups"], shipped["nodes"]
    assert len(groups) >= 3 and all(g["title"] and len(g["bounding"]) == 4 for g in groups), groups
    for node in nodes:
        holders = [g["title"] for g in groups if _inside(g["bounding"], node)]
        assert len(holders) == 1, f"{name}: node {node['id']} ({node.get('title') or node['type']}) is in {holders}"
    for g in groups:
        notes = [n for n in nodes if n["type"] == "MarkdownNote" and _inside(g["bounding"], n)]
        assert len(notes) == 1 and len(notes[0]["widgets_values"][0]) > 40, f"{name}: group {g['title']!r} has no note"
    boxes = [g["bounding"] for g in groups] + [[n["pos"][0], n["pos"][1] - 30, n["size"][0], n["size"][1] + 30] for n in nodes]
    for i, (x, y, w, h) in enumerate(boxes):
        for j, (x2, y2, w2, h2) in enumerate(boxes[:i]):
            nested = i >= len(groups) > j  # a node inside a group
            assert nested or x + w <= x2 or x2 + w2 <= x or y + h <= y2 or y2 + h2 <= y, f"{name}: boxes {j} and {i} overlap"
    ds = shipped["extra"]["ds"]
    assert ds["scale"] >= 0.8
    # What opens in view (the browser tests' 1800 × 1000 window, less 100 px of menus on each axis):
    # every Match Modules panel and the first Compare (ComfyUI draws a node's panel only while the
    # node is in view).
    view = [-ds["offset"][0], -ds["offset"][1], 1700 / ds["scale"], 900 / ds["scale"]]
    shown = [n for n in nodes if n["type"] == "ProLoRAMatchModules"] + [n for n in nodes if n["type"] == "ProLoRACompare"][:1]
    for node in shown:
        (x, y), (w, h) = node["pos"], node["size"]
        assert x + 150 <= view[0] + view[2] and y + 100 <= view[1] + view[3], f"{name}: {node.get('title') or node['type']} opens out of view"
    api = workflows.ALL[name]().api()
    assert all(v["class_type"] not in workflows.VIRTUAL for v in api.values()), "notes never reach the API workflow"


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


def _node_id(graph: workflows.Graph, title: str) -> str:
    return str(next(n.id for n in graph.nodes if n.title == title))


def test_flux_example_runs_with_tiny_flux_krea_and_chroma_swapped_in(server: comfy_host.ComfyServer) -> None:
    """Flux.1-dev → Krea-dev and → Chroma in the graph: both saved; Krea keeps every module, Chroma
    every module but the modulation layers it lacks (reported "not in target" by its match)."""
    graph = workflows.flux_krea_chroma("tiny_flux_dev.safetensors", "tiny_flux_krea.safetensors", "tiny_chroma.safetensors",
                                       "tiny_flux_lora.safetensors", loader="ProLoRATinyModelLoader")
    entry = server.run(graph.api(), timeout=300)
    lora_in = load_file(str(server.base_dir / "models" / "loras" / "tiny_flux_lora.safetensors"))
    saved = server.base_dir / "models" / "loras" / "prolora"
    krea, chroma = (load_file(str(saved / f"flux_lora_to_{t}.safetensors")) for t in ("krea", "chroma"))
    modules = {k.split(".")[0] for k in lora_in}
    assert {k.split(".")[0] for k in krea} == modules and {k.split(".")[0] for k in chroma} == modules - FLUX_MODULATION
    assert any(not torch.equal(krea[k], lora_in[k]) for k in krea if k.endswith("lora_up.weight")), "Krea's LoRA is projected, not copied"
    rows = entry["outputs"][_node_id(graph, "Match Modules: Chroma")]["prolora_match"][0]["rows"]
    missing = [r for r in rows if not r["passes"]]
    assert {r["source"] for r in missing} == {"diffusion_model.double_blocks.0.img_mod.lin.weight",
                                               "diffusion_model.single_blocks.0.modulation.lin.weight"}, missing
    for label in ("Krea", "Chroma"):
        assert entry["outputs"][_node_id(graph, f"Report: {label}")]["images"], f"the {label} report shows its picture"


def test_wan_example_runs_with_tiny_wan_experts_swapped_in(server: comfy_host.ComfyServer) -> None:
    """Wan 2.1 → the high-noise and the low-noise Wan 2.2 expert with the files node: one output per
    expert, named after it, each projected against its own expert."""
    graph = workflows.wan22_experts("diffusion_models/tiny_wan21.safetensors", "diffusion_models/tiny_wan22_high.safetensors",
                                    "diffusion_models/tiny_wan22_low.safetensors", "tiny_wan_lora.safetensors")
    entry = server.run(graph.api(), timeout=300)
    loras = server.base_dir / "models" / "loras"
    lora_in = load_file(str(loras / "tiny_wan_lora.safetensors"))
    outs, from_cache = {}, 0
    for label, stem in (("high-noise", "tiny_wan22_high"), ("low-noise", "tiny_wan22_low")):
        name = f"tiny_wan_lora__to_{stem}.safetensors"
        assert entry["outputs"][_node_id(graph, f"written: {label}")]["text"] == [name]
        summary = entry["outputs"][_node_id(graph, f"summary: {label}")]["text"][0]
        assert f"{len(WAN_MODULES)} transferred" in summary, summary
        from_cache += int(re.search(r"from cache (\d+)", summary).group(1))
        outs[label] = load_file(str(loras / name))
        assert set(outs[label]) == set(lora_in)
    assert from_cache == len(WAN_MODULES), "the second expert's run takes the source's bases from the cache"
    key = "lora_unet_blocks_0_self_attn_q.lora_up.weight"
    assert not torch.equal(outs["high-noise"][key], outs["low-noise"][key]), "each expert gets its own projection"


def test_demo_models_offer_the_turbo_whose_trained_on_target_lora_is_the_sources(server: comfy_host.ComfyServer) -> None:
    """No LoRA is trained on the turbo: Demo Models gives the source's LoRA as its "trained on target"
    output, and the turbo itself is the zoo's turbo file."""
    g = workflows.Graph("turbo_outputs", "")
    demo = g.add("ProLoRADemoModels", target=workflows.TURBO_TARGET, lora="concept")
    for slot, name in ((2, "lora"), (3, "trained")):
        g.add("ProLoRASaveLoRA", lora=demo[slot], filename=f"turbo_check/{name}", key_format="as input", overwrite=True)
    server.run(g.api(), timeout=120)
    folder = server.base_dir / "models" / "loras" / "turbo_check"
    lora, trained = load_file(str(folder / "lora.safetensors")), load_file(str(folder / "trained.safetensors"))
    source = load_file(str(comfy_host.REPO_ROOT / "zoo" / "lora_concept_source.safetensors"))
    assert set(lora) == set(trained) == set(source) and all(torch.equal(trained[k], source[k]) for k in source)


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
