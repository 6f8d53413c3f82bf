"""The example workflows, defined once in Python and written in both of ComfyUI's formats.

* API format (``{"id": {"class_type", "inputs"}}``) is what ``POST /prompt`` takes: the demo and the
  tests queue it directly.
* UI format (LiteGraph, what users drag into ComfyUI and what ``example_workflows/*.json`` holds) is
  derived from the same graph with the server's ``/object_info`` (widget order, socket types).

``python scripts/workflows.py --server URL`` rewrites ``example_workflows/*.json`` from a running
server (the demo script does this when asked with ``--write-workflows``).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "example_workflows"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


@dataclass(frozen=True)
class Ref:
    """Output ``slot`` of node ``node`` (an input link)."""

    node: int
    slot: int = 0


@dataclass
class Node:
    id: int
    type: str
    inputs: dict[str, Any]
    title: str | None = None

    def __getitem__(self, slot: int) -> Ref:
        return Ref(self.id, slot)


@dataclass
class Graph:
    name: str
    description: str
    nodes: list[Node] = field(default_factory=list)

    def add(self, type_: str, title: str | None = None, **inputs: Any) -> Node:
        node = Node(len(self.nodes) + 1, type_, inputs, title)
        self.nodes.append(node)
        return node

    def api(self) -> dict[str, Any]:
        """API format for ``POST /prompt``."""
        out: dict[str, Any] = {}
        for n in self.nodes:
            inputs = {k: ([str(v.node), v.slot] if isinstance(v, Ref) else v) for k, v in n.inputs.items()}
            out[str(n.id)] = {"class_type": n.type, "inputs": inputs, **({"_meta": {"title": n.title}} if n.title else {})}
        return out

    def ui(self, object_info: dict[str, Any]) -> dict[str, Any]:
        """UI (LiteGraph) format, laid out in columns by depth."""
        depth: dict[int, int] = {}
        for n in self.nodes:  # nodes are added in dependency order
            depth[n.id] = 1 + max((depth[v.node] for v in n.inputs.values() if isinstance(v, Ref)), default=-1)
        rows: dict[int, int] = {}
        links: list[list[Any]] = []
        out_links: dict[tuple[int, int], list[int]] = {}
        ui_nodes = []
        for order, n in enumerate(self.nodes):
            info = object_info[n.type]
            spec = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
            names = info.get("input_order", {}).get("required", []) + info.get("input_order", {}).get("optional", [])
            sockets, widgets = [], []
            for name in names:
                typ, opts = spec[name][0], (spec[name][1] if len(spec[name]) > 1 else {})
                is_widget = isinstance(typ, list) or typ in WIDGET_TYPES
                if is_widget:
                    value = n.inputs.get(name, opts.get("default"))
                    if value is None and isinstance(typ, list):
                        value = typ[0] if typ else ""
                    widgets.append(value)
                    if opts.get("control_after_generate"):
                        widgets.append("fixed")
                elif name in n.inputs:
                    ref: Ref = n.inputs[name]
                    link_id = len(links) + 1
                    links.append([link_id, ref.node, ref.slot, n.id, len(sockets), typ])
                    out_links.setdefault((ref.node, ref.slot), []).append(link_id)
                    sockets.append({"name": name, "type": typ, "link": link_id})
            col = depth[n.id]
            row = rows.get(col, 0)
            rows[col] = row + 1
            ui_nodes.append({
                "id": n.id, "type": n.type, "pos": [40 + 340 * col, 40 + 230 * row], "size": [300, 180], "flags": {}, "order": order,
                "mode": 0, "inputs": sockets, "outputs": [], "properties": {"Node name for S&R": n.type}, "widgets_values": widgets,
                **({"title": n.title} if n.title else {}),
            })
        for ui_node, n in zip(ui_nodes, self.nodes):
            info = object_info[n.type]
            ui_node["outputs"] = [{"name": name, "type": typ, "links": out_links.get((n.id, slot), []), "slot_index": slot}
                                  for slot, (name, typ) in enumerate(zip(info["output_name"], info["output"]))]
        return {"last_node_id": len(self.nodes), "last_link_id": len(links), "nodes": ui_nodes, "links": links, "groups": [],
                "config": {}, "extra": {"info": {"name": self.name, "description": self.description}}, "version": 0.4}


def _sample(g: Graph, model: Any, cond: Node, latent: Node, label: str) -> Node:
    ks = g.add("KSampler", title=f"sample: {label}", model=model, seed=7, steps=20, cfg=2.0, sampler_name="euler", scheduler="normal",
               positive=cond[0], negative=cond[1], latent_image=latent[0], denoise=1.0)
    return g.add("ProLoRADemoDecode", samples=ks[0], scale=16)


def _apply(g: Graph, model: Any, lora: Any) -> Any:
    """A ``MODEL`` output: ``model`` with ``lora`` applied at strength 1 by ComfyUI's own LoraModelLoader."""
    return g.add("LoraModelLoader", model=model, lora=lora, strength_model=1.0)[0]


def _compare_and_report(g: Graph, branches: list[tuple[str, Any]], cond: Node, latent: Node, match: Node, lora: Any, prefix: str) -> None:
    """Sample every (label, model) branch from the same seed, save the labelled Compare grid and the
    Match Report picture (of ``lora``, the LoRA Project LoRA made) under ``output/<prefix>/``."""
    images = [_sample(g, model, cond, latent, label) for label, model in branches]
    grid = g.add("ProLoRACompare", **{f"image_{i + 1}": img[0] for i, img in enumerate(images)}, labels="\n".join(lbl for lbl, _ in branches))
    g.add("SaveImage", title="Save grid", images=grid[0], filename_prefix=f"{prefix}/grid")
    report = g.add("ProLoRAReportImage", match=match[0], lora=lora)
    g.add("SaveImage", title="Save report", images=report[0], filename_prefix=f"{prefix}/report")


def side_by_side() -> Graph:
    """(a) The style LoRA of the zoo's source moved to its gently fine-tuned descendant, next to the
    alternatives: source + LoRA | target | target + ProLoRA | target + copied LoRA | target +
    LoRA trained on it | unrelated model + ProLoRA."""
    g = Graph("prolora_side_by_side", "Transfer a demo LoRA to each demo target and compare side by side (runs as shipped).")
    cond = g.add("ProLoRADemoConditioning", prompt="disc")
    latent = g.add("EmptyLatentImage", width=64, height=64, batch_size=4)
    demo = g.add("ProLoRADemoModels", target="descendant, gentle fine-tune", lora="style")
    other = g.add("ProLoRADemoModels", title="Demo Models: unrelated", target="unrelated C", lora="style")
    b_src = g.add("ProLoRAComputeBasis", model=demo[0], subspace_rank=0, device="auto", use_cache=True, name="zoo source")
    b_tgt = g.add("ProLoRAComputeBasis", model=demo[1], subspace_rank=0, device="auto", use_cache=True, name="zoo gentle descendant")
    b_unrel = g.add("ProLoRAComputeBasis", model=other[1], subspace_rank=0, device="auto", use_cache=True, name="zoo unrelated C")
    match = g.add("ProLoRAMatchModules", source_basis=b_src[0], target_basis=b_tgt[0], lora=demo[2], threshold=0.8, pairing="name")
    match_unrel = g.add("ProLoRAMatchModules", title="Match Modules: unrelated", source_basis=b_src[0], target_basis=b_unrel[0], lora=demo[2],
                        threshold=0.8, pairing="name")
    proj = g.add("ProLoRAProjectLoRA", lora=demo[2], match=match[0], mode="prolora-full", out_rank=0, rescale_to_source_norm=False)
    copy = g.add("ProLoRAProjectLoRA", title="Project LoRA: copy (baseline)", lora=demo[2], match=match[0], mode="copy", out_rank=0,
                 rescale_to_source_norm=False)
    proj_unrel = g.add("ProLoRAProjectLoRA", title="Project LoRA: unrelated", lora=demo[2], match=match_unrel[0], mode="prolora-full",
                       out_rank=0, rescale_to_source_norm=False)
    branches = [
        ("source + LoRA", _apply(g, demo[0], demo[2])),
        ("target, no LoRA", demo[1]),
        ("target + ProLoRA", _apply(g, demo[1], proj[0])),
        ("target + copy", _apply(g, demo[1], copy[0])),
        ("target + trained", _apply(g, demo[1], demo[3])),
        ("unrelated + ProLoRA", _apply(g, other[1], proj_unrel[0])),
    ]
    _compare_and_report(g, branches, cond, latent, match, proj[0], "prolora_demo")
    return g


def several_loras() -> Graph:
    """(c) Two LoRAs (style and concept) transferred against one pair of bases and one match."""
    g = Graph("prolora_several_loras", "Transfer several LoRAs against one basis (runs as shipped).")
    latent = g.add("EmptyLatentImage", width=64, height=64, batch_size=4)
    style = g.add("ProLoRADemoModels", title="Demo Models: style", target="descendant, gentle fine-tune", lora="style")
    concept = g.add("ProLoRADemoModels", title="Demo Models: concept", target="descendant, gentle fine-tune", lora="concept")
    b_src = g.add("ProLoRAComputeBasis", model=style[0], subspace_rank=0, device="auto", use_cache=True, name="zoo source")
    b_tgt = g.add("ProLoRAComputeBasis", model=style[1], subspace_rank=0, device="auto", use_cache=True, name="zoo gentle descendant")
    match = g.add("ProLoRAMatchModules", title="Match Modules (all modules, shared)", source_basis=b_src[0], target_basis=b_tgt[0],
                  threshold=0.8, pairing="name")
    disc = g.add("ProLoRADemoConditioning", title="prompt: disc", prompt="disc")
    ring = g.add("ProLoRADemoConditioning", title="prompt: red ring", prompt="red ring")
    images = []
    labels = []
    for name, demo, cond in (("style", style, disc), ("concept", concept, ring)):
        proj = g.add("ProLoRAProjectLoRA", title=f"Project LoRA: {name}", lora=demo[2], match=match[0], mode="prolora-full", out_rank=0,
                     rescale_to_source_norm=False)
        g.add("ProLoRASaveLoRA", title=f"Save LoRA: {name}", lora=proj[0], filename=f"prolora/zoo_{name}_to_gentle_descendant", key_format="as input",
              overwrite=True)
        for label, model in ((f"{name}: target", demo[1]), (f"{name}: target + ProLoRA", _apply(g, demo[1], proj[0]))):
            images.append(_sample(g, model, cond, latent, label))
            labels.append(label)
    grid = g.add("ProLoRACompare", **{f"image_{i + 1}": img[0] for i, img in enumerate(images)}, labels="\n".join(labels))
    g.add("SaveImage", title="Save grid", images=grid[0], filename_prefix="prolora_several/grid")
    return g


def pruned_target() -> Graph:
    """(d) The concept LoRA moved to the zoo's pruned descendant B (like SSD-1B: blocks removed and
    renumbered), paired by similarity and by name: source + LoRA | B | B + ProLoRA (similarity) |
    B + ProLoRA (name) | B + copy | B + trained."""
    g = Graph("prolora_pruned_target", "Transfer a demo LoRA to a pruned, renumbered target: similarity pairing against name pairing "
              "and copy (runs as shipped).")
    cond = g.add("ProLoRADemoConditioning", prompt="red ring")
    latent = g.add("EmptyLatentImage", width=64, height=64, batch_size=4)
    demo = g.add("ProLoRADemoModels", target="descendant B, pruned + distilled", lora="concept")
    b_src = g.add("ProLoRAComputeBasis", model=demo[0], subspace_rank=0, device="auto", use_cache=True, name="zoo source")
    b_tgt = g.add("ProLoRAComputeBasis", model=demo[1], subspace_rank=0, device="auto", use_cache=True, name="zoo pruned descendant B")
    by_sim = g.add("ProLoRAMatchModules", title="Match Modules: by similarity", source_basis=b_src[0], target_basis=b_tgt[0], lora=demo[2],
                   threshold=0.8, pairing="similarity")
    by_name = g.add("ProLoRAMatchModules", title="Match Modules: by name", source_basis=b_src[0], target_basis=b_tgt[0], lora=demo[2],
                    threshold=0.8, pairing="name")
    proj_sim = g.add("ProLoRAProjectLoRA", title="Project LoRA: similarity pairing", lora=demo[2], match=by_sim[0], mode="prolora-full",
                     out_rank=0, rescale_to_source_norm=False)
    proj_name = g.add("ProLoRAProjectLoRA", title="Project LoRA: name pairing", lora=demo[2], match=by_name[0], mode="prolora-full",
                      out_rank=0, rescale_to_source_norm=False)
    copy = g.add("ProLoRAProjectLoRA", title="Project LoRA: copy (baseline)", lora=demo[2], match=by_name[0], mode="copy", out_rank=0,
                 rescale_to_source_norm=False)
    branches = [
        ("source + LoRA", _apply(g, demo[0], demo[2])),
        ("B, no LoRA", demo[1]),
        ("B + ProLoRA (sim.)", _apply(g, demo[1], proj_sim[0])),
        ("B + ProLoRA (name)", _apply(g, demo[1], proj_name[0])),
        ("B + copy", _apply(g, demo[1], copy[0])),
        ("B + trained", _apply(g, demo[1], demo[3])),
    ]
    _compare_and_report(g, branches, cond, latent, by_sim, proj_sim[0], "prolora_pruned")
    return g


#: The real-checkpoint example's file names, as shipped (users pick theirs in the loader nodes).
REAL_SOURCE, REAL_TARGET, REAL_LORA = "sd_xl_base_1.0.safetensors", "ssd-1b.safetensors", "my_sdxl_lora.safetensors"


def real_checkpoints(source: str = REAL_SOURCE, target: str = REAL_TARGET, lora: str = REAL_LORA, loader: str = "CheckpointLoaderSimple") -> Graph:
    """(b) A real LoRA moved between real checkpoints picked in loader nodes (SDXL → SSD-1B:
    pruned, renumbered blocks, so pairing by similarity), then saved into models/loras.

    ``loader="ProLoRATinyModelLoader"`` swaps in the tiny models for the tests (no CLIP then)."""
    g = Graph("prolora_real_checkpoints", "Transfer a real LoRA between real checkpoints (e.g. SDXL → SSD-1B) and save it. "
              "Pick your own files in the loader nodes.")
    key = "ckpt_name" if loader == "CheckpointLoaderSimple" else "model_name"
    src = g.add(loader, title="source checkpoint (the LoRA's base)", **{key: source})
    tgt = g.add(loader, title="target checkpoint", **{key: target})
    lora_node = g.add("ProLoRALoadLoRA", lora_name=lora)
    clip = loader == "CheckpointLoaderSimple"
    b_src = g.add("ProLoRAComputeBasis", model=src[0], **({"clip": src[1]} if clip else {}), subspace_rank=0, device="auto", use_cache=True,
                  name=source)
    b_tgt = g.add("ProLoRAComputeBasis", model=tgt[0], **({"clip": tgt[1]} if clip else {}), subspace_rank=0, device="auto", use_cache=True,
                  name=target)
    match = g.add("ProLoRAMatchModules", source_basis=b_src[0], target_basis=b_tgt[0], lora=lora_node[0], threshold=0.8, pairing="similarity")
    proj = g.add("ProLoRAProjectLoRA", lora=lora_node[0], match=match[0], mode="prolora-full", out_rank=0, rescale_to_source_norm=False)
    g.add("ProLoRASaveLoRA", lora=proj[0], filename="prolora/transferred_to_target", key_format="as input", overwrite=False)
    return g


RUNNABLE = {"prolora_side_by_side": side_by_side, "prolora_several_loras": several_loras, "prolora_pruned_target": pruned_target}
ALL = {**RUNNABLE, "prolora_real_checkpoints": real_checkpoints}


def write_examples(object_info: dict[str, Any], folder: Path = EXAMPLES) -> list[Path]:
    """Write every example's UI format to ``folder/<name>.json``."""
    folder.mkdir(exist_ok=True)
    paths = []
    for name, make in ALL.items():
        path = folder / f"{name}.json"
        path.write_text(json.dumps(make().ui(object_info), indent=1) + "\n")
        paths.append(path)
    return paths


def main() -> None:
    import requests

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", required=True, help="URL of a running ComfyUI with the pack, e.g. http://127.0.0.1:8188")
    args = ap.parse_args()
    session = requests.Session()
    session.trust_env = False
    info = session.get(args.server.rstrip("/") + "/object_info", timeout=60).json()
    for p in write_examples(info):
        print(p)


if __name__ == "__main__":
    main()
