"""The pack's web side in a real browser against a real ComfyUI server.

Debian's Chromium (``/usr/bin/chromium``) is driven by ``tests/browser/drive.mjs`` through
``playwright-core`` (pinned in ``tests/browser/package.json``; no browser download). The server gets
tiny source/target models, a LoRA and two input PNGs; a UI-format workflow (transfer → sample →
SaveLatent, plus Compare on two LoadImage nodes and the Report image) is loaded through the
frontend (``app.loadGraphData``), must convert back to the API workflow it was built from, is queued
with ``app.queuePrompt(0)``, and the Match Modules / Compare panels must show the values of that run
in ``/history``. Screenshots go to ``artifacts/``.

Missing tools FAIL the test (never skip): install them with
``apt-get install -y chromium`` and ``npm ci --prefix tests/browser``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from safetensors.torch import save_file

import comfy_host
from browser_host import drive

pytestmark = pytest.mark.server

PACK_URL = f"/extensions/{comfy_host.PACK_DIR_NAME}"
MODULES = [
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    "input_blocks.1.1.proj_in",
    "input_blocks.1.0.in_layers.2",
    "middle_block.1.transformer_blocks.0.ff.net.2",
    "output_blocks.2.1.transformer_blocks.0.attn1.to_v",
    "output_blocks.3.0.out_layers.3",
]
#: Widget-type inputs (everything else in /object_info is a link input).
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _input_pngs(folder: Path) -> None:
    from PIL import Image, ImageDraw

    for name, (dx, colour) in {"prolora_a.png": (0, (220, 60, 40)), "prolora_b.png": (14, (40, 90, 220))}.items():
        img = Image.new("RGB", (96, 64), (235, 225, 200))
        d = ImageDraw.Draw(img)
        d.ellipse([20 + dx, 12, 60 + dx, 52], fill=colour)
        d.rectangle([0, 56, 96, 64], fill=(60, 60, 60))
        img.save(folder / name)


@pytest.fixture(scope="module")
def server(comfyui: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[comfy_host.ComfyServer]:
    """A real server with a tiny SD1.5 source, a target whose output blocks are new weights (so the
    LoRA's output-block modules are skipped), a LoRA, and two input PNGs."""
    base = comfy_host.prepare_base_dir(tmp_path_factory.mktemp("browser_base"))
    src, tgt, fresh = comfy_host.tiny_sd15_model(0), comfy_host.tiny_sd15_model(0), comfy_host.tiny_sd15_model(11)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for (name, p_s), p_t, p_f in zip(src.model.named_parameters(), tgt.model.parameters(), fresh.model.parameters()):
            p_t.copy_(p_f if "output_blocks" in name else p_s + 0.05 * p_s.abs().mean() * torch.randn(p_s.shape, generator=gen))
    comfy_host.save_model_state(src, base / "models" / "diffusion_models" / "tiny_src.safetensors")
    comfy_host.save_model_state(tgt, base / "models" / "diffusion_models" / "tiny_tgt.safetensors")
    save_file(comfy_host.kohya_lora(src, MODULES), str(base / "models" / "loras" / "style.safetensors"))
    _input_pngs(base / "input")
    server = comfy_host.start_comfy_server(base)
    yield server
    server.stop()


def api_workflow() -> dict[str, dict[str, Any]]:
    """The API-format workflow the UI workflow must be equivalent to (ids are the UI node ids)."""
    return {
        "1": {"class_type": "ProLoRATinyModelLoader", "inputs": {"model_name": "tiny_src.safetensors"}},
        "2": {"class_type": "ProLoRATinyModelLoader", "inputs": {"model_name": "tiny_tgt.safetensors"}},
        "3": {"class_type": "ProLoRALoadLoRA", "inputs": {"lora_name": "style.safetensors"}},
        "4": {"class_type": "ProLoRAComputeBasis", "inputs": {"model": ["1", 0], "subspace_rank": 0, "device": "cpu", "use_cache": True}},
        "5": {"class_type": "ProLoRAComputeBasis", "inputs": {"model": ["2", 0], "subspace_rank": 0, "device": "cpu", "use_cache": True}},
        "6": {"class_type": "ProLoRAMatchModules", "inputs": {"source_basis": ["4", 0], "target_basis": ["5", 0], "lora": ["3", 0],
                                                               "threshold": 0.6, "pairing": "name"}},
        "7": {"class_type": "ProLoRAProjectLoRA", "inputs": {"lora": ["3", 0], "match": ["6", 0], "mode": "prolora-full", "out_rank": 0,
                                                              "rescale_to_source_norm": False}},
        "8": {"class_type": "LoraModelLoader", "inputs": {"model": ["2", 0], "lora": ["7", 0], "strength_model": 1.0}},
        "9": {"class_type": "ProLoRATinyConditioning", "inputs": {"model": ["8", 0], "text": "a red disc"}},
        "10": {"class_type": "ProLoRATinyConditioning", "inputs": {"model": ["8", 0], "text": ""}},
        "11": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "12": {"class_type": "KSampler", "inputs": {"model": ["8", 0], "seed": 1, "steps": 2, "cfg": 2.0, "sampler_name": "euler",
                                                     "scheduler": "normal", "positive": ["9", 0], "negative": ["10", 0],
                                                     "latent_image": ["11", 0], "denoise": 1.0}},
        "13": {"class_type": "SaveLatent", "inputs": {"samples": ["12", 0], "filename_prefix": "prolora_browser"}},
        "14": {"class_type": "LoadImage", "inputs": {"image": "prolora_a.png"}},
        "15": {"class_type": "LoadImage", "inputs": {"image": "prolora_b.png"}},
        "16": {"class_type": "ProLoRACompare", "inputs": {"image_1": ["14", 0], "image_2": ["15", 0], "labels": "source\ntransferred"}},
        "17": {"class_type": "ProLoRAReportImage", "inputs": {"match": ["6", 0], "lora": ["7", 0]}},
    }


#: Canvas placement (x, y, w, h, collapsed): the panels on top, everything else collapsed on the left.
LAYOUT = {"6": (250, 40, 500, 460, False), "16": (770, 40, 380, 470, False), "17": (1170, 40, 520, 480, False)}


def with_defaults(api: dict[str, dict[str, Any]], object_info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``api`` with every widget input it leaves out set to its default (what the frontend sends for
    an untouched optional widget)."""
    out = {}
    for node_id, node in api.items():
        info = object_info[node["class_type"]]
        inputs = dict(node["inputs"])
        for name, spec in {**info["input"].get("required", {}), **info["input"].get("optional", {})}.items():
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            if name not in inputs and (isinstance(kind, list) or kind in WIDGET_TYPES) and "default" in opts:
                inputs[name] = opts["default"]
        out[node_id] = {"class_type": node["class_type"], "inputs": inputs}
    return out


def ui_workflow(api: dict[str, dict[str, Any]], object_info: dict[str, Any]) -> dict[str, Any]:
    """The UI-format (litegraph) equivalent of ``api``, with inputs, outputs and widget order taken
    from the server's /object_info exactly as the frontend builds them."""
    nodes, links = [], []
    link_id = 0
    out_links: dict[tuple[str, int], list[int]] = {}
    in_links: dict[tuple[str, str], int] = {}
    for node_id, node in api.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                link_id += 1
                origin, slot = value
                otype = object_info[api[origin]["class_type"]]["output"][slot]
                links.append([link_id, int(origin), slot, int(node_id), None, otype])
                out_links.setdefault((origin, slot), []).append(link_id)
                in_links[(node_id, name)] = link_id
    by_id = {link[0]: link for link in links}
    collapsed_row = 0
    for order, (node_id, node) in enumerate(api.items()):
        info = object_info[node["class_type"]]
        inputs, widgets = [], []
        spec = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        for name in info["input_order"].get("required", []) + info["input_order"].get("optional", []):
            kind, opts = spec[name][0], (spec[name][1] if len(spec[name]) > 1 else {})
            is_widget = isinstance(kind, list) or kind in WIDGET_TYPES
            if not is_widget:
                link = in_links.get((node_id, name))
                if link is not None:
                    by_id[link][4] = len(inputs)
                inputs.append({"name": name, "type": kind, "link": link})
                continue
            widgets.append(node["inputs"][name])
            if opts.get("control_after_generate"):
                widgets.append("fixed")
            if opts.get("image_upload"):
                widgets.append("image")
        outputs = [{"name": oname, "type": otype, "links": out_links.get((node_id, slot), []), "slot_index": slot}
                   for slot, (oname, otype) in enumerate(zip(info["output_name"], info["output"]))]
        if node_id in LAYOUT:
            x, y, w, h, collapsed = LAYOUT[node_id]
        else:
            x, y, w, h, collapsed = 20, 40 + 42 * collapsed_row, 220, 80, True
            collapsed_row += 1
        nodes.append({"id": int(node_id), "type": node["class_type"], "pos": [x, y], "size": [w, h], "flags": {"collapsed": collapsed},
                      "order": order, "mode": 0, "inputs": inputs, "outputs": outputs, "properties": {"Node name for S&R": node["class_type"]},
                      "widgets_values": widgets})
    return {"last_node_id": max(int(k) for k in api), "last_link_id": link_id, "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {"ds": {"scale": 1.0, "offset": [70, 150]}}, "version": 0.4}


def test_extensions_list_our_js_exactly_once_and_docs_are_served(server: comfy_host.ComfyServer) -> None:
    ours = [e for e in server.get("/extensions") if e.startswith(PACK_URL + "/")]
    assert ours == [f"{PACK_URL}/prolora.js"], ours
    node_ids = [k for k, v in server.object_info().items() if v.get("python_module", "").endswith(comfy_host.PACK_DIR_NAME)]
    assert len(node_ids) >= 11 and "ProLoRACompare" in node_ids and "ProLoRAReportImage" in node_ids
    for node_id in node_ids:  # where the frontend looks: /extensions/<pack>/docs/<NodeId>.md
        r = server.http.get(f"{server.url}{PACK_URL}/docs/{node_id}.md", timeout=10)
        assert r.status_code == 200 and r.text.startswith("# "), node_id


def test_workflow_in_the_browser_shows_the_match_report_and_compare_slider(server: comfy_host.ComfyServer, tmp_path: Path) -> None:
    server.http.post(server.url + "/settings", json={"Comfy.TutorialCompleted": True}, timeout=10).raise_for_status()
    api = with_defaults(api_workflow(), server.object_info())
    result = drive(server, ui_workflow(api, server.object_info()), tmp_path)
    assert result["extensions_in_app"] == 1
    ours = [e for e in result["page_errors"] + result["console_errors"] + result["failed_requests"] if PACK_URL in e or "prolora" in e]
    assert not ours, ours
    assert {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in result["prompt"].items()} == api  # UI ≡ API workflow
    entry = server.wait(result["prompt_id"], timeout=30)
    assert result["status"] == "success" == entry["status"]["status_str"], entry["status"]
    assert list((server.base_dir / "output").glob("prolora_browser*.latent"))

    report = entry["outputs"]["6"]["prolora_match"][0]
    panel = result["match_panel"]
    assert panel["visible"], panel
    assert (int(panel["passing"]), int(panel["modules"]), float(panel["threshold"])) == (report["passing"], report["modules"], report["threshold"])
    assert int(panel["skipped"]) == report["modules"] - report["passing"] and panel["pairing"] == report["pairing"] == "name"
    assert 0 < report["passing"] < report["modules"] == len(MODULES)  # some transferred, the output-block ones skipped
    assert panel["strip_cells"] == len(panel["rows"]) == report["modules"]
    in_order = [r["block"] for r in sorted(report["rows"], key=lambda r: r["order"])]
    assert panel["strip_blocks"] == in_order  # the strip draws the node's grouping, it does not regroup
    assert in_order[0] == "in 1" and in_order[-1] == "out 3" and panel["strip_gaps"] == len(dict.fromkeys(in_order)) - 1
    assert panel["groups"] == report["groups"] and sum(panel["groups"].values()) == int(panel["lora_modules"]) == report["lora_modules"] == len(MODULES)
    by_source = {r["source"]: r for r in report["rows"]}
    for row in panel["rows"]:
        assert row["cls"] == ("pass" if by_source[row["source"]]["passes"] else "skip"), row
    assert panel["rows"][0]["cls"] == "skip"  # lowest Φ first

    cmp_ui = entry["outputs"]["16"]["prolora_compare"][0]
    cpanel = result["compare_panel"]
    assert cpanel["options"] == cmp_ui["labels"] == ["source", "transferred"]
    assert (cpanel["left"], cpanel["right"]) == ("source", "transferred") and cpanel["tags"] == ["source", "transferred"]
    pair = cmp_ui["pairs"][0]
    assert f"rmse {pair['rmse']:.4f}" in cpanel["distance"] and pair["rmse"] > 0.01
    saved = entry["outputs"]["16"]["images"]
    for img, want in zip(cpanel["images"], saved):
        assert f"filename={want['filename']}" in img["src"] and (img["h"], img["w"]) == tuple(cmp_ui["cell"]), img
    assert cpanel["clip"] == "inset(0px 0px 0px 25%)" or cpanel["clip"] == "inset(0 0 0 25%)", cpanel["clip"]
    assert entry["outputs"]["17"]["images"], "the Report node previews its picture"
    for path in result["screenshots"].values():
        assert Path(path).is_file() and Path(path).stat().st_size > 10_000, path
