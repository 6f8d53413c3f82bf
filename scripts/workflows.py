"""The example workflows, defined once in Python and written in both of ComfyUI's formats.

* API format (``{"id": {"class_type", "inputs"}}``) is what ``POST /prompt`` takes: the demo and the
  tests queue it directly.
* UI format (LiteGraph, what users drag into ComfyUI and what ``example_workflows/*.json`` holds) is
  derived from the same graph with the server's ``/object_info`` (widget order, socket types), laid
  out in titled groups (models and LoRA, transfer, sampling, compare), each opened by a short note
  saying what to pick and what to look at, at a size read without zooming.

``python scripts/workflows.py --server URL`` rewrites ``example_workflows/*.json`` from a running
server (the demo script does this when asked with ``--write-workflows``); ``--thumbnails`` also runs
the workflows that run as shipped and writes each ``.jpg`` thumbnail from its saved picture.
"""
from __future__ import annotations

import argparse
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "example_workflows"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
#: Frontend-only nodes: in the UI file, never in the API workflow (the frontend drops them when queueing).
VIRTUAL = {"MarkdownNote", "Note"}

# Layout, in canvas pixels at zoom 1 (ComfyUI's default font is 14 px; a widget row is about 26 px).
NODE_W, GAP, PAD, TITLE_H = 300, 30, 24, 56
TITLE_CHAR_W = 12  # a group title's width per character (24 px font)
SOCKET_H, WIDGET_H, MULTILINE_H, NODE_TITLE_H = 22, 26, 76, 30  # NODE_TITLE_H: drawn above a node's pos
#: Nodes that show a picture or panel after a run get room for it.
MIN_SIZE = {"ProLoRAMatchModules": (480, 460), "ProLoRACompare": (440, 470), "ProLoRAReportImage": (460, 380),
            "SaveImage": (300, 320), "PreviewAny": (360, 200), "ProLoRATransferLoRAFiles": (440, 0)}
NOTE_COLOR, NOTE_BG = "#432", "#653"
GROUP_COLORS = ["#3f789e", "#8A8", "#a1309b", "#b58b2a", "#88A", "#444"]
VIEW_SCALE = 0.8  # the zoom a dragged-in workflow opens at: models, transfer and compare in view on a 1800 × 1000 window


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
    group: int = 0
    lane: int | None = None

    def __getitem__(self, slot: int) -> Ref:
        return Ref(self.id, slot)


@dataclass
class Group:
    """A titled box on the canvas, its note on top. ``arrange``: ``depth`` (one column per graph
    depth) or ``lanes`` (one column per lane, e.g. per compared branch, then the nodes without one).
    Groups with the same ``row`` sit side by side, rows stack downwards."""

    title: str
    note: str
    row: int
    arrange: str = "depth"


@dataclass
class Graph:
    name: str
    description: str
    nodes: list[Node] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)

    def group(self, title: str, note: str, *, row: int = 0, arrange: str = "depth") -> None:
        """Start a group: the nodes added from now on belong to it."""
        self.groups.append(Group(title, note, row, arrange))

    def add(self, type_: str, title: str | None = None, lane: int | None = None, **inputs: Any) -> Node:
        node = Node(len(self.nodes) + 1, type_, inputs, title, max(len(self.groups) - 1, 0), lane)
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
        """UI (LiteGraph) format: every group's note first, then its nodes; ``groups`` with their
        bounding boxes ``[x, y, w, h]``."""
        links: list[list[Any]] = []
        out_links: dict[tuple[int, int], list[int]] = {}
        ui_nodes: dict[int, dict[str, Any]] = {}
        sizes: dict[int, tuple[int, int]] = {}
        for order, n in enumerate(self.nodes):
            info = object_info[n.type]
            spec = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
            names = info.get("input_order", {}).get("required", []) + info.get("input_order", {}).get("optional", [])
            sockets, widgets = [], []
            height = 0
            for name in names:
                typ, opts = spec[name][0], (spec[name][1] if len(spec[name]) > 1 else {})
                is_widget = isinstance(typ, list) or typ in WIDGET_TYPES
                if is_widget:
                    value = n.inputs.get(name, opts.get("default"))
                    if value is None and isinstance(typ, list):
                        value = typ[0] if typ else ""
                    widgets.append(value)
                    height += MULTILINE_H if opts.get("multiline") else WIDGET_H
                    if opts.get("control_after_generate"):
                        widgets.append("fixed")
                        height += WIDGET_H
                elif name in n.inputs:
                    ref: Ref = n.inputs[name]
                    link_id = len(links) + 1
                    links.append([link_id, ref.node, ref.slot, n.id, len(sockets), typ])
                    out_links.setdefault((ref.node, ref.slot), []).append(link_id)
                    sockets.append({"name": name, "type": typ, "link": link_id})
            slots = max(len(sockets), len(info["output"]))
            min_w, min_h = MIN_SIZE.get(n.type, (NODE_W, 0))
            sizes[n.id] = (max(NODE_W, min_w), max(SOCKET_H * slots + height + 12, min_h))
            ui_nodes[n.id] = {
                "id": n.id, "type": n.type, "pos": [0, 0], "size": list(sizes[n.id]), "flags": {}, "order": order, "mode": 0,
                "inputs": sockets, "outputs": [], "properties": {"Node name for S&R": n.type}, "widgets_values": widgets,
                **({"title": n.title} if n.title else {}),
            }
        for n in self.nodes:
            info = object_info[n.type]
            ui_nodes[n.id]["outputs"] = [{"name": name, "type": typ, "links": out_links.get((n.id, slot), []), "slot_index": slot}
                                         for slot, (name, typ) in enumerate(zip(info["output_name"], info["output"]))]
        positions, boxes, notes = self._layout(sizes)
        for node_id, pos in positions.items():
            ui_nodes[node_id]["pos"] = list(pos)
        next_id = len(self.nodes)
        note_nodes = []
        for gi, (text, (x, y, w, h)) in enumerate(notes):
            next_id += 1
            note_nodes.append({"id": next_id, "type": "MarkdownNote", "title": "Note", "pos": [x, y], "size": [w, h], "flags": {},
                               "order": len(self.nodes) + gi, "mode": 0, "inputs": [], "outputs": [], "properties": {},
                               "widgets_values": [text], "color": NOTE_COLOR, "bgcolor": NOTE_BG})
        groups = [{"id": i + 1, "title": g.title, "bounding": list(box), "color": GROUP_COLORS[i % len(GROUP_COLORS)], "font_size": 24,
                   "flags": {}} for i, (g, box) in enumerate(zip(self.groups, boxes))]
        return {"last_node_id": next_id, "last_link_id": len(links), "nodes": note_nodes + [ui_nodes[n.id] for n in self.nodes],
                "links": links, "groups": groups, "config": {},
                "extra": {"ds": {"scale": VIEW_SCALE, "offset": [0, 0]}, "info": {"name": self.name, "description": self.description}},
                "version": 0.4}

    def _layout(self, sizes: dict[int, tuple[int, int]]) -> tuple[dict[int, tuple[int, int]], list[tuple[int, int, int, int]],
                                                                   list[tuple[str, tuple[int, int, int, int]]]]:
        """Positions of the nodes, the groups' boxes and the notes' boxes (canvas pixels)."""
        depth: dict[int, int] = {}
        for n in self.nodes:  # nodes are added in dependency order
            depth[n.id] = 1 + max((depth[v.node] for v in n.inputs.values() if isinstance(v, Ref)), default=-1)
        members: list[list[Node]] = [[n for n in self.nodes if n.group == gi] for gi in range(max(len(self.groups), 1))]
        local: dict[int, tuple[int, int]] = {}
        extents = []
        for gi, group in enumerate(self.groups or [Group("", "", 0)]):
            nodes = members[gi]
            if group.arrange == "depth":
                ranks = sorted({depth[n.id] for n in nodes})
                stacks = [[n for n in nodes if depth[n.id] == d] for d in ranks]
            else:
                lanes = sorted({n.lane for n in nodes if n.lane is not None})
                stacks = [[n for n in nodes if n.lane == lane] for lane in lanes] + [[n for n in nodes if n.lane is None]]
                stacks = [s for s in stacks if s]
            w = h = 0
            for stack in stacks:  # a column of nodes, top to bottom
                y = 0
                for n in stack:
                    local[n.id] = (w, y + NODE_TITLE_H)
                    y += NODE_TITLE_H + sizes[n.id][1] + GAP
                w, h = w + max(sizes[n.id][0] for n in stack) + GAP, max(h, y - GAP)
            w -= GAP
            note_w = max(360, min(w, 760))
            chars = max(20, note_w // 8)
            lines = sum(max(1, math.ceil(len(line) / chars)) for line in group.note.splitlines()) if group.note else 0
            note_h = 30 + 21 * lines if group.note else 0
            extents.append((max(w, note_w, TITLE_CHAR_W * len(group.title)), h, note_w, note_h))
        positions: dict[int, tuple[int, int]] = {}
        boxes: dict[int, tuple[int, int, int, int]] = {}
        notes = []
        y_row, x = 40, 40
        row_of = [g.row for g in (self.groups or [Group("", "", 0)])]
        for row in sorted(set(row_of)):
            x, row_h = 40, 0
            for gi, r in enumerate(row_of):
                if r != row:
                    continue
                w, h, note_w, note_h = extents[gi]
                top = y_row + TITLE_H + (NODE_TITLE_H + note_h + GAP if note_h else 0)
                for n in members[gi]:
                    lx, ly = local[n.id]
                    positions[n.id] = (x + PAD + lx, top + ly)
                if note_h and gi < len(self.groups):
                    notes.append((self.groups[gi].note, (x + PAD, y_row + TITLE_H + NODE_TITLE_H, note_w, note_h)))
                box = (x, y_row, w + 2 * PAD, top + h + PAD - y_row)
                boxes[gi] = box
                x += box[2] + 2 * GAP
                row_h = max(row_h, box[3])
            y_row += row_h + 2 * GAP
        return positions, [boxes[gi] for gi in range(len(self.groups))], notes


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------

#: The protocol's full schedule for the zoo models and the turbo's own few-step one (zoo/README.md).
FULL = {"steps": 15, "cfg": 2.0, "scheduler": "normal"}
#: What the first examples sample with (the zoo's models, any schedule of ComfyUI's defaults works).
DEFAULT = {"steps": 20, "cfg": 2.0, "scheduler": "normal"}
TURBO = {"steps": 4, "cfg": 1.0, "scheduler": "sgm_uniform"}


@dataclass
class Branch:
    """One compared column: ``model`` sampled (with ``lora`` applied at strength 1 by ComfyUI's own
    LoraModelLoader when given) with ``schedule``."""

    label: str
    model: Any
    lora: Any = None
    schedule: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT))


def _sample_branches(g: Graph, branches: list[Branch], cond: Node, latent: Node) -> list[Node]:
    """Each branch in its own lane: apply the LoRA, sample from seed 7, decode. Returns the decoders."""
    images = []
    for lane, b in enumerate(branches):
        model = b.model
        if b.lora is not None:
            model = g.add("LoraModelLoader", title=f"apply: {b.label}", lane=lane, model=b.model, lora=b.lora, strength_model=1.0)[0]
        s = b.schedule
        ks = g.add("KSampler", title=f"sample: {b.label}", lane=lane, model=model, seed=7, steps=s["steps"], cfg=s["cfg"], sampler_name="euler",
                   scheduler=s["scheduler"], positive=cond[0], negative=cond[1], latent_image=latent[0], denoise=1.0)
        images.append(g.add("ProLoRADemoDecode", title=f"decode: {b.label}", lane=lane, samples=ks[0], scale=16))
    return images


def _compare(g: Graph, images: list[Node], labels: list[str], prefix: str, lane: int) -> None:
    grid = g.add("ProLoRACompare", lane=lane, **{f"image_{i + 1}": img[0] for i, img in enumerate(images)}, labels="\n".join(labels))
    g.add("SaveImage", title="Save grid", lane=lane, images=grid[0], filename_prefix=prefix)


def _loader(g: Graph, loader: str, file: str, title: str) -> Node:
    """A model loader node: core UNETLoader / CheckpointLoaderSimple, or the pack's tiny-model
    loader the tests swap in."""
    key = {"CheckpointLoaderSimple": "ckpt_name", "UNETLoader": "unet_name"}.get(loader, "model_name")
    return g.add(loader, title=title, **{key: file})


SAMPLE_NOTE = ("Every column samples the same prompt from the same seed (KSampler seed 7, fixed); only the model and the "
               "LoRA differ. To change the seed or steps, change them in every sampler.")


# --------------------------------------------------------------------------------------
# The workflows
# --------------------------------------------------------------------------------------

def side_by_side() -> Graph:
    """(a) The style LoRA of the zoo's source moved to its gently fine-tuned descendant, next to the
    alternatives: source + LoRA | target | target + ProLoRA | target + copied LoRA | target +
    LoRA trained on it | unrelated model + ProLoRA."""
    g = Graph("prolora_side_by_side", "Transfer a demo LoRA to each demo target and compare side by side (runs as shipped).")
    g.group("1 · models and LoRA (zoo)",
            "**Pick** the target and the LoRA in *Demo Models*: the source is the model the LoRA was trained on. The second "
            "*Demo Models* gives an unrelated model, to see what the Φ filter does where the LoRA does not belong.")
    cond = g.add("ProLoRADemoConditioning", prompt="disc")
    latent = g.add("EmptyLatentImage", width=64, height=64, batch_size=4)
    demo = g.add("ProLoRADemoModels", target="descendant, gentle fine-tune", lora="style")
    other = g.add("ProLoRADemoModels", title="Demo Models: unrelated", target="unrelated C", lora="style")
    g.group("2 · transfer", "Bases of the source and of each target, one match per pair, then Project LoRA: ProLoRA (prolora-full) and "
            "the plain copy to compare with. **Look at** Match Modules: how many modules pass Φ ≥ 0.8 (all for the descendant, "
            "few or none for the unrelated model).")
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
    g.group("4 · sample each branch (for the grid in 3)", SAMPLE_NOTE, row=1, arrange="lanes")
    branches = [Branch("source + LoRA", demo[0], demo[2]), Branch("target, no LoRA", demo[1]), Branch("target + ProLoRA", demo[1], proj[0]),
                Branch("target + copy", demo[1], copy[0]), Branch("target + trained", demo[1], demo[3]),
                Branch("unrelated + ProLoRA", other[1], proj_unrel[0])]
    images = _sample_branches(g, branches, cond, latent)
    g.group("3 · compare (branches sampled in 4, below)",
            "**Look at** the grid: a good transfer looks like *source + LoRA* in the target's own style, and like "
            "*target + trained*. Drag the slider in Compare to flip between two columns. The report shows Φ per module and the "
            "LoRA's norm before and after.", row=0, arrange="lanes")
    _compare(g, images, [b.label for b in branches], "prolora_demo/grid", lane=0)
    report = g.add("ProLoRAReportImage", lane=1, match=match[0], lora=proj[0])
    g.add("SaveImage", title="Save report", lane=1, images=report[0], filename_prefix="prolora_demo/report")
    return g


def several_loras() -> Graph:
    """(c) Two LoRAs (style and concept) transferred against one pair of bases and one match."""
    g = Graph("prolora_several_loras", "Transfer several LoRAs against one basis (runs as shipped).")
    g.group("1 · models and LoRAs (zoo)",
            "**Pick** the target in both *Demo Models* (the same one): each gives one LoRA, style or concept.")
    latent = g.add("EmptyLatentImage", width=64, height=64, batch_size=4)
    style = g.add("ProLoRADemoModels", title="Demo Models: style", target="descendant, gentle fine-tune", lora="style")
    concept = g.add("ProLoRADemoModels", title="Demo Models: concept", target="descendant, gentle fine-tune", lora="concept")
    disc = g.add("ProLoRADemoConditioning", title="prompt: disc", prompt="disc")
    ring = g.add("ProLoRADemoConditioning", title="prompt: red ring", prompt="red ring")
    g.group("2 · transfer (one match, several LoRAs)", "One pair of bases and one match over all modules serve every LoRA: add a "
            "Project LoRA per LoRA. Each result is saved into models/loras/prolora/ (core *Load LoRA* lists it).", arrange="lanes")
    b_src = g.add("ProLoRAComputeBasis", lane=0, model=style[0], subspace_rank=0, device="auto", use_cache=True, name="zoo source")
    b_tgt = g.add("ProLoRAComputeBasis", lane=0, model=style[1], subspace_rank=0, device="auto", use_cache=True, name="zoo gentle descendant")
    match = g.add("ProLoRAMatchModules", title="Match Modules (all modules, shared)", lane=1, source_basis=b_src[0], target_basis=b_tgt[0],
                  threshold=0.8, pairing="name")
    projected = {}
    for name, demo in (("style", style), ("concept", concept)):  # each LoRA's projection above its save, in one column
        proj = g.add("ProLoRAProjectLoRA", title=f"Project LoRA: {name}", lane=2, lora=demo[2], match=match[0], mode="prolora-full", out_rank=0,
                     rescale_to_source_norm=False)
        g.add("ProLoRASaveLoRA", title=f"Save LoRA: {name}", lane=2, lora=proj[0], filename=f"prolora/zoo_{name}_to_gentle_descendant",
              key_format="as input",
              overwrite=True)
        projected[name] = proj
    g.group("4 · sample each branch (for the grid in 3)", SAMPLE_NOTE, row=1, arrange="lanes")
    images, labels, lane = [], [], 0
    for name, demo, cond in (("style", style, disc), ("concept", concept, ring)):
        for branch in (Branch(f"{name}: target", demo[1]), Branch(f"{name}: target + ProLoRA", demo[1], projected[name][0])):
            offset = len(g.nodes)
            images += _sample_branches(g, [branch], cond, latent)
            for n in g.nodes[offset:]:
                n.lane = lane
            labels.append(branch.label)
            lane += 1
    g.group("3 · compare (sampled in 4)", "**Look at** the grid: the style LoRA draws yellow diagonal stripes, the concept LoRA a red ring under "
            "its prompt; both should appear on the target once transferred.", row=0, arrange="lanes")
    _compare(g, images, labels, "prolora_several/grid", lane=0)
    return g


def pruned_target() -> Graph:
    """(d) The concept LoRA moved to the zoo's pruned descendant B (like SSD-1B: blocks removed and
    renumbered), paired by similarity and by name: source + LoRA | B | B + ProLoRA (similarity) |
    B + ProLoRA (name) | B + copy | B + trained."""
    g = Graph("prolora_pruned_target", "Transfer a demo LoRA to a pruned, renumbered target: similarity pairing against name pairing "
              "and copy (runs as shipped).")
    g.group("1 · models and LoRA (zoo)",
            "Descendant B is pruned like SSD-1B from SDXL: blocks removed, the rest renumbered, so a module name can point at "
            "another block's weights.")
    cond = g.add("ProLoRADemoConditioning", prompt="red ring")
    latent = g.add("EmptyLatentImage", width=64, height=64, batch_size=4)
    demo = g.add("ProLoRADemoModels", target="descendant B, pruned + distilled", lora="concept")
    g.group("2 · transfer: pairing by similarity and by name", "**Look at** the two Match Modules: pairing by similarity finds each "
            "source module's counterpart in B whatever its name; pairing by name sends renumbered modules to the wrong block.")
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
    g.group("4 · sample each branch (for the grid in 3)", SAMPLE_NOTE, row=1, arrange="lanes")
    branches = [Branch("source + LoRA", demo[0], demo[2]), Branch("B, no LoRA", demo[1]), Branch("B + ProLoRA (sim.)", demo[1], proj_sim[0]),
                Branch("B + ProLoRA (name)", demo[1], proj_name[0]), Branch("B + copy", demo[1], copy[0]),
                Branch("B + trained", demo[1], demo[3])]
    images = _sample_branches(g, branches, cond, latent)
    g.group("3 · compare (branches sampled in 4, below)",
            "**Look at** the grid: the red ring of *source + LoRA* should appear on B; the similarity-paired transfer "
            "comes closest to *B + trained* over the protocol's samples.", row=0, arrange="lanes")
    _compare(g, images, [b.label for b in branches], "prolora_pruned/grid", lane=0)
    report = g.add("ProLoRAReportImage", lane=1, match=by_sim[0], lora=proj_sim[0])
    g.add("SaveImage", title="Save report", lane=1, images=report[0], filename_prefix="prolora_pruned/report")
    return g


#: The turbo target's option in Demo Models.
TURBO_TARGET = "turbo, 4-step student"


def turbo_target() -> Graph:
    """(e) The zoo's style and concept LoRAs moved to its turbo target (a 4-step student distilled
    from the source), compared in the turbo's own few-step sampling: Copy | prolora-full (the
    default) | casa, next to the source + LoRA sampled with the full schedule."""
    g = Graph("prolora_turbo_target", "Move the demo LoRAs to a distilled few-step turbo target: Copy, the default (prolora-full) and casa "
              "side by side in the turbo's 4-step sampling (runs as shipped).")
    g.group("1 · models and LoRAs (zoo)",
            "The turbo is a few-step student of the source (like SDXL-Turbo from SDXL): sample it with **euler, sgm_uniform, "
            "4 steps, cfg 1**. No LoRA was trained on it: people train on the base and run on the turbo.")
    latent = g.add("EmptyLatentImage", width=64, height=64, batch_size=4)
    style = g.add("ProLoRADemoModels", title="Demo Models: style", target=TURBO_TARGET, lora="style")
    concept = g.add("ProLoRADemoModels", title="Demo Models: concept", target=TURBO_TARGET, lora="concept")
    disc = g.add("ProLoRADemoConditioning", title="prompt: disc", prompt="disc")
    ring = g.add("ProLoRADemoConditioning", title="prompt: red ring", prompt="red ring")
    g.group("2 · transfer: copy, prolora-full (default), casa", "One match over all modules serves both LoRAs. **casa** arbitrates "
            "between the LoRA and the turbo's departure from the source in the source's singular directions (slower: full SVDs).")
    b_src = g.add("ProLoRAComputeBasis", model=style[0], subspace_rank=0, device="auto", use_cache=True, name="zoo source")
    b_tgt = g.add("ProLoRAComputeBasis", model=style[1], subspace_rank=0, device="auto", use_cache=True, name="zoo turbo")
    match = g.add("ProLoRAMatchModules", title="Match Modules (all modules, shared)", source_basis=b_src[0], target_basis=b_tgt[0],
                  threshold=0.8, pairing="name")
    modes = ("copy", "prolora-full", "casa")
    projected = {(name, mode): g.add("ProLoRAProjectLoRA", title=f"Project LoRA: {name}, {mode}", lora=demo[2], match=match[0], mode=mode,
                                     out_rank=0, rescale_to_source_norm=False)
                 for name, demo in (("style", style), ("concept", concept)) for mode in modes}
    grids = []
    for row, (name, demo, cond) in enumerate((("style", style, disc), ("concept", concept, ring)), start=1):
        g.group(f"{3 + row} · {name} LoRA: sample each branch (for the grid in 3)",
                "The first column is the reference: the **source** + LoRA with the full schedule (15 steps, cfg 2). The others run "
                "the **turbo** in its own 4 steps, cfg 1." if row == 1 else "As above, with the concept LoRA under its prompt (red ring).",
                row=row, arrange="lanes")
        branches = [Branch("source + LoRA", demo[0], demo[2], schedule=dict(FULL)), Branch("turbo, no LoRA", demo[1], schedule=dict(TURBO))]
        branches += [Branch(f"turbo + {mode}", demo[1], projected[(name, mode)][0], schedule=dict(TURBO)) for mode in modes]
        grids.append((name, _sample_branches(g, branches, cond, latent), [b.label for b in branches]))
    g.group("3 · compare (branches sampled in 4 and 5, below)",
            "**Look at** each grid: how much of the source + LoRA's effect (yellow stripes; the red ring) each mode "
            "brings to the turbo's 4-step samples while keeping its content. Measured over 3 seeds (gap closed, style / concept): "
            "copy 0.75 / 0.80, prolora-full 0.64 / 0.80, casa 0.76 / 0.82: casa ties Copy (README, Evidence).", row=0, arrange="lanes")
    for lane, (name, images, labels) in enumerate(grids):
        grid = g.add("ProLoRACompare", title=f"Compare: {name}", lane=lane, **{f"image_{i + 1}": img[0] for i, img in enumerate(images)},
                     labels="\n".join(labels))
        g.add("SaveImage", title=f"Save grid: {name}", lane=lane, images=grid[0], filename_prefix=f"prolora_turbo/grid_{name}")
    return g


#: The real-checkpoint example's file names, as shipped (users pick theirs in the loader nodes).
REAL_SOURCE, REAL_TARGET, REAL_LORA = "sd_xl_base_1.0.safetensors", "ssd-1b.safetensors", "my_sdxl_lora.safetensors"


def real_checkpoints(source: str = REAL_SOURCE, target: str = REAL_TARGET, lora: str = REAL_LORA, loader: str = "CheckpointLoaderSimple") -> Graph:
    """(b) A real LoRA moved between real checkpoints picked in loader nodes (SDXL → SSD-1B:
    pruned, renumbered blocks, so pairing by similarity), then saved into models/loras.

    ``loader="ProLoRATinyModelLoader"`` swaps in the tiny models for the tests (no CLIP then)."""
    g = Graph("prolora_real_checkpoints", "Transfer a real LoRA between real checkpoints (e.g. SDXL → SSD-1B) and save it. "
              "Pick your own files in the loader nodes.")
    clip = loader == "CheckpointLoaderSimple"
    g.group("1 · source + LoRA", "**Pick** the checkpoint the LoRA was trained on (here SDXL base) and the LoRA (models/loras).")
    src = _loader(g, loader, source, "source checkpoint (the LoRA's base)")
    lora_node = g.add("ProLoRALoadLoRA", lora_name=lora)
    g.group("2 · target", "**Pick** the checkpoint to move the LoRA to (here SSD-1B, a pruned SDXL).")
    tgt = _loader(g, loader, target, "target checkpoint")
    g.group("3 · transfer", "Pairing **similarity** finds each module's counterpart in a pruned, renumbered target; use **name** for "
            "fine-tunes. Bases are cached: a second LoRA on the same pair computes no SVD. The result is saved into "
            "models/loras/prolora/.", row=1)
    b_src = g.add("ProLoRAComputeBasis", model=src[0], **({"clip": src[1]} if clip else {}), subspace_rank=0, device="auto", use_cache=True,
                  name=source)
    b_tgt = g.add("ProLoRAComputeBasis", model=tgt[0], **({"clip": tgt[1]} if clip else {}), subspace_rank=0, device="auto", use_cache=True,
                  name=target)
    match = g.add("ProLoRAMatchModules", source_basis=b_src[0], target_basis=b_tgt[0], lora=lora_node[0], threshold=0.8, pairing="similarity")
    proj = g.add("ProLoRAProjectLoRA", lora=lora_node[0], match=match[0], mode="prolora-full", out_rank=0, rescale_to_source_norm=False)
    g.add("ProLoRASaveLoRA", lora=proj[0], filename="prolora/transferred_to_target", key_format="as input", overwrite=False)
    g.group("4 · check", "**Look at** the report: Φ per module (which modules the target shares with the source) and the LoRA's norm "
            "before and after. Then load the saved LoRA on the target with core *Load LoRA*.", row=1)
    g.add("ProLoRAReportImage", match=match[0], lora=proj[0])
    return g


#: The Flux example's file names, as shipped (ComfyUI's repackaged names; users pick theirs).
FLUX_DEV, FLUX_KREA, CHROMA, FLUX_LORA = "flux1-dev.safetensors", "flux1-krea-dev.safetensors", "Chroma1-HD.safetensors", "my_flux_lora.safetensors"


def flux_krea_chroma(source: str = FLUX_DEV, krea: str = FLUX_KREA, chroma: str = CHROMA, lora: str = FLUX_LORA,
                     loader: str = "UNETLoader") -> Graph:
    """(f) A Flux.1-dev LoRA moved to Flux.1 Krea-dev and to Chroma in the graph: one source basis,
    one match and projection per target, both saved. Chroma has no per-block modulation layers: the
    LoRA's modules there are reported "not in target" and the rest transfers.

    ``loader="ProLoRATinyModelLoader"`` swaps in tiny Flux/Chroma models for the tests."""
    g = Graph("prolora_flux_krea_chroma", "Transfer a Flux.1-dev LoRA to Flux.1 Krea-dev and to Chroma and save both. Pick your own "
              "files in the loader nodes (models/diffusion_models).")
    g.group("1 · source + LoRA", "**Pick** Flux.1-dev (the LoRA's base; fp8 or bf16) and the LoRA: kohya, ai-toolkit/diffusers, "
            "SimpleTuner or OneTrainer files all work; q/k/v LoRAs sit on slices of the fused qkv weights.")
    src = _loader(g, loader, source, "source: Flux.1-dev")
    lora_node = g.add("ProLoRALoadLoRA", lora_name=lora)
    g.group("2 · targets", "**Pick** the targets: Flux.1 Krea-dev (same architecture) and Chroma (Flux without the per-block "
            "modulation layers).")
    t_krea = _loader(g, loader, krea, "target: Flux.1 Krea-dev")
    t_chroma = _loader(g, loader, chroma, "target: Chroma")
    g.group("3 · transfer (one source basis, two targets)", "The source's bases are computed once and cached. Each target gets its own "
            "match and projection; the results go to models/loras/prolora/. Large models: the bases take a while the first time.")
    b_src = g.add("ProLoRAComputeBasis", model=src[0], subspace_rank=0, device="auto", use_cache=True, name=source)
    checks = []
    for label, tgt, file in (("Krea", t_krea, krea), ("Chroma", t_chroma, chroma)):
        b_tgt = g.add("ProLoRAComputeBasis", title=f"Compute Basis: {label}", model=tgt[0], subspace_rank=0, device="auto", use_cache=True,
                      name=file)
        match = g.add("ProLoRAMatchModules", title=f"Match Modules: {label}", source_basis=b_src[0], target_basis=b_tgt[0], lora=lora_node[0],
                      threshold=0.8, pairing="name")
        proj = g.add("ProLoRAProjectLoRA", title=f"Project LoRA: {label}", lora=lora_node[0], match=match[0], mode="prolora-full", out_rank=0,
                     rescale_to_source_norm=False)
        g.add("ProLoRASaveLoRA", title=f"Save LoRA: {label}", lora=proj[0], filename=f"prolora/flux_lora_to_{label.lower()}",
              key_format="as input", overwrite=False)
        checks.append((label, match, proj))
    g.group("4 · check", "**Look at** each report: Φ per module and the norms. On Chroma the modulation layers (img_mod, txt_mod, "
            "modulation.lin) show as *not in target*; everything else should transfer.", row=1, arrange="lanes")
    for lane, (label, match, proj) in enumerate(checks):
        g.add("ProLoRAReportImage", title=f"Report: {label}", lane=lane, match=match[0], lora=proj[0])
    return g


#: The Wan example's file names, as the files node lists them (ComfyUI's repackaged names).
WAN21 = "diffusion_models/wan2.1_t2v_14B_fp16.safetensors"
WAN22_HIGH = "diffusion_models/wan2.2_t2v_high_noise_14B_fp16.safetensors"
WAN22_LOW = "diffusion_models/wan2.2_t2v_low_noise_14B_fp16.safetensors"
WAN_LORA = "my_wan21_lora.safetensors"


def wan22_experts(source: str = WAN21, high: str = WAN22_HIGH, low: str = WAN22_LOW, lora: str = WAN_LORA) -> Graph:
    """(g) A Wan 2.1 14B LoRA moved to both Wan 2.2 A14B experts with the files node (no model is
    loaded for sampling; the files are read module by module): one output per expert, named after it."""
    g = Graph("prolora_wan22_experts", "Transfer a Wan 2.1 14B LoRA to both Wan 2.2 A14B experts (high-noise and low-noise) with the "
              "files node. Pick your own files.")
    settings = {"more_loras": "", "mode": "prolora-full", "subspace_rank": 0, "threshold": 0.8, "pairing": "name",
                "filename_pattern": "{lora}__to_{target}", "device": "auto"}
    outs = []
    for row, (label, target) in enumerate((("high-noise", high), ("low-noise", low))):
        g.group(f"{row + 1} · Wan 2.1 LoRA → {label}",
                ("**Pick** the Wan 2.1 14B file the LoRA was trained on (source_model), the LoRA, and the Wan 2.2 **high-noise** "
                 "expert as target_model. Both experts have Wan 2.1 14B's shapes. Wan 2.2 runs the high-noise expert first, then "
                 "the low-noise one: load each output on its expert.") if row == 0 else
                "The same source and LoRA, the **low-noise** expert as target. The source's bases come from the cache this time.",
                row=0)
        outs.append((label, g.add("ProLoRATransferLoRAFiles", title=f"Transfer LoRA (files): {label} expert", source_model=source,
                                  target_model=target, lora_name=lora, **settings)))
    g.group("3 · what was written", "The saved file names (models/loras, next to the input LoRA) and the summary: modules "
            "transferred and skipped with their reasons. Load each file with core *LoraLoaderModelOnly* on its expert.", row=1,
            arrange="lanes")
    for lane, (label, node) in enumerate(outs):
        g.add("PreviewAny", title=f"written: {label}", lane=lane, source=node[0])
        g.add("PreviewAny", title=f"summary: {label}", lane=lane, source=node[1])
    return g


RUNNABLE = {"prolora_side_by_side": side_by_side, "prolora_several_loras": several_loras, "prolora_pruned_target": pruned_target,
            "prolora_turbo_target": turbo_target}
#: Shipped with real checkpoint file names: the tests run them with tiny models swapped in.
WITH_REAL_FILES = {"prolora_real_checkpoints": real_checkpoints, "prolora_flux_krea_chroma": flux_krea_chroma,
                   "prolora_wan22_experts": wan22_experts}
ALL = {**RUNNABLE, **WITH_REAL_FILES}


# --------------------------------------------------------------------------------------
# Writing the files
# --------------------------------------------------------------------------------------

def write_examples(object_info: dict[str, Any], folder: Path = EXAMPLES) -> list[Path]:
    """Write every example's UI format to ``folder/<name>.json``."""
    folder.mkdir(exist_ok=True)
    paths = []
    for name, make in ALL.items():
        path = folder / f"{name}.json"
        path.write_text(json.dumps(make().ui(object_info), indent=1, ensure_ascii=False) + "\n")
        paths.append(path)
    return paths


def layout_picture(ui: dict[str, Any], width: int = 800) -> Any:
    """A picture of a UI workflow's layout (groups, notes, nodes with their titles), for the
    thumbnails of the workflows that need the user's own files."""
    from PIL import Image, ImageDraw

    boxes = [g["bounding"] for g in ui["groups"]] + [[*n["pos"], *n["size"]] for n in ui["nodes"]]
    x0, y0 = min(b[0] for b in boxes) - 20, min(b[1] for b in boxes) - 50
    x1, y1 = max(b[0] + b[2] for b in boxes) + 20, max(b[1] + b[3] for b in boxes) + 20
    s = width / (x1 - x0)
    img = Image.new("RGB", (width, max(128, round((y1 - y0) * s))), (32, 32, 32))
    d = ImageDraw.Draw(img)
    t = lambda x, y: (round((x - x0) * s), round((y - y0) * s))  # noqa: E731
    for g in ui["groups"]:
        x, y, w, h = g["bounding"]
        d.rectangle([t(x, y), t(x + w, y + h)], outline=g["color"], width=2)
        d.rectangle([t(x, y), t(x + w, y + 40)], fill=g["color"])
        d.text(t(x + 10, y + 10), g["title"], fill=(255, 255, 255))
    for n in ui["nodes"]:
        x, y = n["pos"]
        w, h = n["size"]
        d.rectangle([t(x, y - 30), t(x + w, y + h)], fill=(101, 85, 51) if n["type"] in VIRTUAL else (53, 53, 53), outline=(90, 90, 90))
        d.text(t(x + 8, y - 24), (n.get("title") or n["type"])[:40], fill=(220, 220, 220))
    return img


def write_thumbnails(server: str, object_info: dict[str, Any], folder: Path = EXAMPLES, timeout_s: float = 900) -> list[Path]:
    """``folder/<name>.jpg`` for every example: the first grid the workflow saves, from a run on
    ``server`` (the ones that run as shipped), or a picture of its layout (the ones that need the
    user's files)."""
    import time

    import requests
    from PIL import Image

    session = requests.Session()
    session.trust_env = False
    paths = []
    for name, make in ALL.items():
        path = folder / f"{name}.jpg"
        if name in RUNNABLE:
            prompt_id = session.post(server + "/prompt", json={"prompt": make().api()}, timeout=60).json()["prompt_id"]
            deadline = time.monotonic() + timeout_s
            while (entry := session.get(f"{server}/history/{prompt_id}", timeout=60).json().get(prompt_id)) is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} did not finish within {timeout_s} s")
                time.sleep(1)
            if entry["status"].get("status_str") != "success":
                raise RuntimeError(f"{name} failed on {server}: {entry['status']}")
            saved = sorted((img for out in entry["outputs"].values() for img in out.get("images", [])
                            if img.get("type") == "output" and "grid" in img["filename"]), key=lambda img: (img["subfolder"], img["filename"]))
            r = session.get(server + "/view", params={"filename": saved[0]["filename"], "subfolder": saved[0]["subfolder"], "type": "output"},
                            timeout=60)
            r.raise_for_status()
            picture = Image.open(io.BytesIO(r.content)).convert("RGB")
            if picture.width > 900:
                picture = picture.resize((900, round(picture.height * 900 / picture.width)), Image.LANCZOS)
        else:
            picture = layout_picture(make().ui(object_info))
        picture.save(path, "JPEG", quality=88)
        paths.append(path)
    return paths


def main() -> None:
    import requests

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", required=True, help="URL of a running ComfyUI with the pack, e.g. http://127.0.0.1:8188")
    ap.add_argument("--thumbnails", action="store_true", help="also run the runnable examples and write every .jpg thumbnail")
    args = ap.parse_args()
    server = args.server.rstrip("/")
    session = requests.Session()
    session.trust_env = False
    info = session.get(server + "/object_info", timeout=60).json()
    for p in write_examples(info):
        print(p)
    if args.thumbnails:
        for p in write_thumbnails(server, info):
            print(p)


if __name__ == "__main__":
    main()
