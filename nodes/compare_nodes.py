"""Looking at results: **Compare** (a labelled grid of up to six image branches, with pairwise
distances and a side-by-side slider in the web UI) and **Report** (a picture of a match: Φ per
module over the model's blocks, the threshold and chance levels, and source vs transferred LoRA
norms). Only drawing and simple image statistics live here; the transfer itself is the engine's.
"""
from __future__ import annotations

import math
import random
import re
import string
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from comfy_api.latest import io, ui
from PIL import Image, ImageDraw, ImageFont

from ..prolora_core.projection import MODES
from ..prolora_core.transfer import DEFAULT_MODE, TransferConfig
from .matching import project_lora_model
from .transfer_nodes import CATEGORY, PREFIX, LoraModelType, Match

MAX_BRANCHES = 6
#: Largest cell side of the Compare grid; bigger inputs are scaled down to it.
MAX_CELL_SIDE = 2048
BACKGROUND = (0.13, 0.13, 0.13)
GAP = 4
HIST_BINS = 16
STRUCTURE_SIZE = 64

# --------------------------------------------------------------------------------------
# Compare: helpers
# --------------------------------------------------------------------------------------


def parse_labels(text: str, count: int) -> list[str]:
    """``count`` labels from ``text``: one per line, or comma-separated on a single line; missing
    ones become ``image_N``, extra ones are ignored."""
    text = (text or "").strip()
    parts = text.splitlines() if "\n" in text else text.split(",")
    labels = [p.strip() for p in parts]
    return [(labels[i] if i < len(labels) and labels[i] else f"image_{i + 1}") for i in range(count)]


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """An IMAGE batch as ``[B, H, W, 3]`` float32 in [0, 1] (grey repeated, alpha dropped)."""
    t = images.detach().to("cpu", torch.float32)
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4:
        raise ValueError(f"an IMAGE must be [batch, height, width, channels], got shape {tuple(images.shape)}")
    c = t.shape[-1]
    if c == 1:
        t = t.expand(-1, -1, -1, 3)
    elif c == 2:
        t = t[..., :1].expand(-1, -1, -1, 3)
    elif c > 3:
        t = t[..., :3]
    return torch.nan_to_num(t, nan=0.0).clamp(0.0, 1.0).contiguous()


def common_cell(sizes: Sequence[tuple[int, int]], max_side: int = MAX_CELL_SIDE) -> tuple[int, int]:
    """The grid's cell ``(height, width)``: the largest height and width among the branches,
    scaled down (aspect kept) so that no side exceeds ``max_side``."""
    h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
    scale = min(1.0, max_side / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def fit_to_cell(images: torch.Tensor, cell: tuple[int, int], fill: Sequence[float] = BACKGROUND) -> torch.Tensor:
    """Resize ``[B, H, W, 3]`` into ``cell`` keeping the aspect ratio (bilinear, antialiased) and pad
    the rest with ``fill``, centred."""
    ch, cw = cell
    b, h, w, _ = images.shape
    if (h, w) == (ch, cw):
        return images
    scale = min(ch / h, cw / w)
    nh, nw = max(1, min(ch, round(h * scale))), max(1, min(cw, round(w * scale)))
    x = images.permute(0, 3, 1, 2)
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True).clamp(0.0, 1.0)
    out = torch.tensor(fill, dtype=torch.float32).view(1, 3, 1, 1).expand(b, 3, ch, cw).clone()
    top, left = (ch - nh) // 2, (cw - nw) // 2
    out[:, :, top:top + nh, left:left + nw] = x
    return out.permute(0, 2, 3, 1).contiguous()


def label_font(cell_width: int) -> Any:
    """PIL's default font, sized to the cell (a scalable font where Pillow has FreeType)."""
    size = int(min(48, max(12, cell_width // 14)))
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # old Pillow or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_width(font: Any, text: str) -> int:
    box = font.getbbox(text)
    return box[2] - box[0]


def fit_text(font: Any, text: str, width: int) -> str:
    """``text`` cut (with '...') so that it fits ``width`` pixels."""
    if _text_width(font, text) <= width:
        return text
    while text and _text_width(font, text + "...") > width:
        text = text[:-1]
    return text + "..." if text else ""


def label_band_height(font: Any) -> int:
    box = font.getbbox("Ag|")
    return (box[3] - box[1]) + 2 * max(4, (box[3] - box[1]) // 3)


@dataclass
class GridLayout:
    """Where things are in a Compare grid (pixels)."""

    cell: tuple[int, int]
    band: int
    rows: int
    columns: int
    gap: int = GAP

    @property
    def size(self) -> tuple[int, int]:
        h = self.band + self.rows * self.cell[0] + (self.rows + 1) * self.gap
        w = self.columns * self.cell[1] + (self.columns + 1) * self.gap
        return h, w

    def cell_origin(self, row: int, column: int) -> tuple[int, int]:
        return self.band + self.gap + row * (self.cell[0] + self.gap), self.gap + column * (self.cell[1] + self.gap)


def make_grid(branches: Sequence[torch.Tensor], labels: Sequence[str]) -> tuple[torch.Tensor, GridLayout]:
    """One labelled grid image ``[1, H, W, 3]``: each branch (already fitted to a common cell) a
    column, its batch items rows, the label above each column. Missing batch items stay empty."""
    cell = tuple(branches[0].shape[1:3])
    font = label_font(cell[1])
    layout = GridLayout(cell=cell, band=label_band_height(font), rows=max(b.shape[0] for b in branches), columns=len(branches))  # type: ignore[arg-type]
    h, w = layout.size
    canvas = torch.tensor(BACKGROUND, dtype=torch.float32).view(1, 1, 3).expand(h, w, 3).clone()
    for c, branch in enumerate(branches):
        for r in range(branch.shape[0]):
            y, x = layout.cell_origin(r, c)
            canvas[y:y + cell[0], x:x + cell[1]] = branch[r]
    band = Image.new("RGB", (w, layout.band), tuple(int(255 * v) for v in BACKGROUND))
    draw = ImageDraw.Draw(band)
    for c, label in enumerate(labels):
        text = fit_text(font, label, cell[1] - 4)
        x0 = layout.gap + c * (cell[1] + layout.gap)
        box = font.getbbox(text or " ")
        tx = x0 + (cell[1] - (box[2] - box[0])) // 2 - box[0]
        ty = (layout.band - (box[3] - box[1])) // 2 - box[1]
        draw.text((tx, ty), text, fill=(240, 240, 240), font=font)
    canvas[:layout.band] = torch.from_numpy(np.asarray(band, dtype=np.float32) / 255.0)
    return canvas.unsqueeze(0), layout


def colour_histogram(image: torch.Tensor, bins: int = HIST_BINS) -> torch.Tensor:
    """Per-channel ``bins``-bin histograms of ``[H, W, 3]``, each summing to 1: ``[3, bins]``."""
    return torch.stack([torch.histc(image[..., c].double(), bins=bins, min=0.0, max=1.0) for c in range(3)]) / (image.shape[0] * image.shape[1])


def structure_map(image: torch.Tensor, size: int = STRUCTURE_SIZE) -> torch.Tensor:
    """Luminance gradient magnitude of ``[H, W, 3]`` on a ``size``×``size`` area-averaged grid (flattened)."""
    lum = (image.double() @ torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)).unsqueeze(0).unsqueeze(0)
    small = F.adaptive_avg_pool2d(lum, (min(size, image.shape[0]), min(size, image.shape[1])))[0, 0]
    gy = torch.zeros_like(small)
    gx = torch.zeros_like(small)
    gy[1:-1] = (small[2:] - small[:-2]) / 2
    gx[:, 1:-1] = (small[:, 2:] - small[:, :-2]) / 2
    return torch.sqrt(gx * gx + gy * gy).flatten()


def image_distances(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Distances between two same-size images ``[H, W, 3]`` in [0, 1]:

    * ``rmse``: root-mean-square pixel difference (0 = identical, 1 = black vs white);
    * ``colour``: total-variation distance of the 16-bin per-channel colour histograms, averaged over
      R, G, B (0 = same colour distribution, 1 = disjoint);
    * ``structure``: 1 − cosine similarity of the 64×64 luminance gradient-magnitude maps (0 = same
      edges; a flat image against a textured one gives 1).
    """
    rmse = float(torch.sqrt(torch.mean((a.double() - b.double()) ** 2)))
    colour = float(0.5 * (colour_histogram(a) - colour_histogram(b)).abs().sum(dim=1).mean())
    sa, sb = structure_map(a), structure_map(b)
    na, nb = float(sa.norm()), float(sb.norm())
    if na < 1e-12 and nb < 1e-12:
        structure = 0.0
    elif na < 1e-12 or nb < 1e-12:
        structure = 1.0
    else:
        structure = float(1.0 - torch.dot(sa, sb) / (na * nb))
    return {"rmse": rmse, "colour": colour, "structure": max(0.0, structure)}


def branch_distances(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Mean of :func:`image_distances` over the batch items both branches have (paired by index)."""
    n = min(a.shape[0], b.shape[0])
    per = [image_distances(a[i], b[i]) for i in range(n)]
    return {k: sum(p[k] for p in per) / n for k in per[0]} | {"items": n}


DISTANCE_LEGEND = (
    "rmse: root-mean-square pixel difference, values in [0,1] (0 = identical)\n"
    "colour: total-variation distance of 16-bin per-channel colour histograms (0 = same colours, 1 = disjoint)\n"
    "structure: 1 - cosine similarity of 64x64 luminance gradient-magnitude maps (0 = same edges)\n"
    "Images are compared at the common cell size (aspect kept, padded), batch items paired by index."
)


def distance_table(branches: Sequence[torch.Tensor], labels: Sequence[str]) -> tuple[str, list[dict[str, Any]]]:
    """The readable pairwise-distance report (reference = first branch first, then every other pair)
    and the same numbers as a list of dicts."""
    pairs = [(0, j) for j in range(1, len(branches))] + [(i, j) for i in range(1, len(branches)) for j in range(i + 1, len(branches))]
    found = []
    for i, j in pairs:
        d = branch_distances(branches[i], branches[j])
        rounded = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in d.items()}
        found.append({"a": i, "b": j, "a_label": labels[i], "b_label": labels[j], **rounded})
    if not found:
        return f"ProLoRA compare: one branch ({labels[0]}), nothing to compare.", found

    def line(d: dict[str, Any]) -> str:
        items = f" ({d['items']} item{'s' if d['items'] != 1 else ''})" if max(b.shape[0] for b in branches) > 1 else ""
        return f"  {d['a_label']} vs {d['b_label']}: rmse {d['rmse']:.4f}, colour {d['colour']:.4f}, structure {d['structure']:.4f}{items}"

    lines = [f"ProLoRA compare: {len(branches)} branches, reference = {labels[0]}", DISTANCE_LEGEND, "vs reference:"]
    lines += [line(d) for d in found if d["a"] == 0]
    others = [d for d in found if d["a"] != 0]
    if others:
        lines.append("other pairs:")
        lines += [line(d) for d in others]
    return "\n".join(lines), found


def _temp_prefix(tag: str) -> str:
    return f"ProLoRA_{tag}_" + "".join(random.choice(string.ascii_lowercase) for _ in range(6))


# --------------------------------------------------------------------------------------
# Compare: the node
# --------------------------------------------------------------------------------------


class Compare(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        optional = [io.Image.Input(f"image_{i}", optional=True, tooltip=f"Branch {i} (optional): e.g. the same seed through another LoRA, "
                                   "mode or base model.") for i in range(2, MAX_BRANCHES + 1)]
        return io.Schema(
            node_id=f"{PREFIX}Compare", display_name="Compare (ProLoRA)", category=CATEGORY, is_output_node=True,
            description="Puts up to six image branches side by side in one labelled grid (branches as columns, batch items as rows), "
                        "measures how far each branch is from the first and from each other, and shows a slider view in the UI.",
            inputs=[
                io.Image.Input("image_1", tooltip="Branch 1, the reference (e.g. the source model with the original LoRA)."),
                *optional,
                io.String.Input("labels", multiline=True, default="source\ntransferred",
                                tooltip="One label per line (or comma-separated on one line), given to the connected images in order; "
                                        "missing labels become image_N."),
            ],
            outputs=[
                io.Image.Output(display_name="grid", tooltip="The labelled grid, one image [1, H, W, 3]; images of other sizes are "
                                                             "scaled (aspect kept) and padded to a common cell."),
                io.String.Output(display_name="distances", tooltip="Pairwise distances between branches: pixel RMSE, colour-histogram "
                                                                    "distance and gradient-structure distance (first branch = reference)."),
            ],
        )

    @classmethod
    def execute(cls, image_1: torch.Tensor, labels: str = "", image_2: torch.Tensor | None = None, image_3: torch.Tensor | None = None,
                image_4: torch.Tensor | None = None, image_5: torch.Tensor | None = None, image_6: torch.Tensor | None = None) -> io.NodeOutput:
        given = [img for img in (image_1, image_2, image_3, image_4, image_5, image_6) if img is not None]
        rgb = [to_rgb(img) for img in given]
        names = parse_labels(labels, len(rgb))
        cell = common_cell([tuple(t.shape[1:3]) for t in rgb])
        fitted = [fit_to_cell(t, cell) for t in rgb]
        grid, _ = make_grid(fitted, names)
        text, pairs = distance_table(fitted, names)
        saved: list[dict[str, Any]] = []
        index: list[list[int]] = []
        prefix = _temp_prefix("compare")
        for b, branch in enumerate(fitted):
            results = ui.ImageSaveHelper.save_images(branch, f"{prefix}_b{b + 1}", io.FolderType.temp, cls, compress_level=1)
            index.append(list(range(len(saved), len(saved) + len(results))))
            saved.extend(results)
        panel = {"labels": names, "index": index, "batch": [t.shape[0] for t in fitted], "cell": list(cell), "pairs": pairs, "distances": text}
        return io.NodeOutput(grid, text, ui={"images": saved, "prolora_compare": [panel]})


# --------------------------------------------------------------------------------------
# Report: grouping module keys by block
# --------------------------------------------------------------------------------------

_BLOCK_RE = re.compile(r"^(?P<pre>.*?)(?P<name>[A-Za-z_]*(?:blocks?|layers?))\.(?P<idx>\d+)\.(?P<rest>.+)$")
_GROUP = {"input_blocks": (0, "in"), "down_blocks": (0, "down"), "middle_block": (1, "mid"), "mid_block": (1, "mid"),
          "output_blocks": (2, "out"), "up_blocks": (2, "up")}
#: Un-numbered top-level modules shown after the output blocks (everything else un-numbered goes first).
_TAIL = ("out", "norm_out", "conv_out", "proj_out", "final_layer", "final_norm")
_PART_ORDER = {"unet": 0, "clip": 1}


def split_key(part: str, key: str) -> tuple[tuple, str, str]:
    """``(sort key, block label, module kind)`` of a weight key: ``diffusion_model.input_blocks.4.1.
    transformer_blocks.0.attn2.to_k.weight`` → block "in 4", kind "attn2.to_k"; the middle block is
    one block ("mid"); numbered ``*blocks``/``*layers`` of other models (double_blocks.3, encoder.layers.0)
    are blocks too; anything else (time_embed.0, out.2) is a block of its own, named by its first
    component."""
    k = key.removesuffix(".weight").removeprefix("diffusion_model.")
    part_rank = _PART_ORDER.get(part, 2)
    m = _BLOCK_RE.match(k)
    if m is None:
        head, _, rest = k.partition(".")
        label = head if part == "unet" else f"{part}:{head}"
        return (part_rank, 3 if head in _TAIL else -1, 0, head), label, f"{head}.{rest}" if rest else head
    name, idx, rest = m["name"], int(m["idx"]), m["rest"]
    group, short = _GROUP.get(name, (1.5, name.replace("_blocks", "").replace("_block", "").replace("_layers", "") or name))
    if name in ("middle_block", "mid_block"):
        return (part_rank, group, 0, ""), short, _kind(rest)
    if short in ("layers", "layer", "blocks", "block"):
        short = "L" if short.startswith("layer") else "B"
    if part != "unet":
        short = f"{part}:{short}"
    return (part_rank, group, idx, name), f"{short} {idx}", _kind(rest)


def _kind(rest: str) -> str:
    """A module kind with the per-depth indices dropped (``1.transformer_blocks.0.attn1.to_q`` → ``attn1.to_q``);
    a bare layer index (``input_blocks.0.0``, the UNet's first conv) is "conv"."""
    rest = re.sub(r"^(\d+\.)+", "", rest)
    rest = re.sub(r"(^|\.)transformer_blocks\.\d+\.", r"\1", rest)
    return "conv" if rest.isdigit() else rest


@dataclass
class Cell:
    phis: list[float]
    passes: list[bool]

    @property
    def phi(self) -> float:
        return min(self.phis) if self.phis else math.nan


def module_grid(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[str], dict[tuple[str, str], Cell]]:
    """Blocks (model order), kinds (sorted) and per (block, kind) the Φ values and pass flags of its modules."""
    blocks: dict[str, tuple] = {}
    cells: dict[tuple[str, str], Cell] = {}
    for r in rows:
        order, block, kind = split_key(r["part"], r["source"])
        blocks.setdefault(block, order)
        cell = cells.setdefault((block, kind), Cell([], []))
        cell.passes.append(bool(r["passes"]))
        if r["phi_u"] is not None and r["phi_v"] is not None:
            cell.phis.append(min(r["phi_u"], r["phi_v"]))
    ordered = sorted(blocks, key=lambda b: blocks[b])
    kinds = sorted({k for _, k in cells})
    return ordered, kinds, cells


def module_order(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows in model order (block, then kind, then key)."""
    def key(r: dict[str, Any]) -> tuple:
        order, _, kind = split_key(r["part"], r["source"])
        return order, kind, r["source"]
    return sorted(rows, key=key)


@dataclass
class ReportData:
    """Everything the Report picture shows."""

    title: str
    threshold: float
    rows: list[dict[str, Any]]
    norms: list[dict[str, Any]] | None  # per LoRA module: source, source_norm, transferred_norm, transferred
    mode: str | None = None


def report_data(match: Any, lora: Any = None, mode: str = DEFAULT_MODE) -> ReportData:
    """Rows of the match, and — with a LoRA — its modules' norms before and after the projection,
    computed by the very code Project LoRA runs (``project_lora_model``)."""
    norms = None
    if lora is not None:
        base = match.config
        config = TransferConfig(mode=mode, subspace_rank=base.subspace_rank, threshold=base.threshold, pairing=base.pairing,
                                device=base.device, basis=base.basis)
        _, results = project_lora_model(lora, match, config)
        norms = [{"source": m.source_key or m.lora, "source_norm": float(m.source_norm),
                  "transferred_norm": None if m.transferred_norm is None else float(m.transferred_norm), "transferred": bool(m.transferred)}
                 for r in results for m in r.modules]
    rows = match.rows()
    passing = sum(r["passes"] for r in rows)
    title = (f"ProLoRA match {match.source.label} -> {match.target.label}: {passing}/{len(rows)} modules pass "
             f"threshold {match.config.threshold:g} (pairing {match.config.pairing})")
    return ReportData(title=title, threshold=float(match.config.threshold), rows=rows, norms=norms, mode=mode if lora is not None else None)


# --------------------------------------------------------------------------------------
# Report: drawing (matplotlib when present, PIL otherwise)
# --------------------------------------------------------------------------------------

PASS_COLOUR = "#2ca02c"
SKIP_COLOUR = "#d62728"
REPORT_SIZE = (1400, 1000)


def _phi(r: dict[str, Any]) -> float:
    return math.nan if r["phi_u"] is None or r["phi_v"] is None else min(r["phi_u"], r["phi_v"])


def render_report(data: ReportData, use_matplotlib: bool = True) -> torch.Tensor:
    """The report picture as an IMAGE ``[1, H, W, 3]`` float32 in [0, 1]."""
    if use_matplotlib:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            use_matplotlib = False
    pixels = _render_matplotlib(data) if use_matplotlib else _render_pil(data)
    return torch.from_numpy(np.ascontiguousarray(pixels[..., :3], dtype=np.float32) / 255.0).unsqueeze(0)


def _render_matplotlib(data: ReportData) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    dpi = 100
    fig = Figure(figsize=(REPORT_SIZE[0] / dpi, REPORT_SIZE[1] / dpi), dpi=dpi, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    gs = fig.add_gridspec(2, 2, height_ratios=[1.15, 1], width_ratios=[1.35, 1], hspace=0.42, wspace=0.22,
                          left=0.1, right=0.97, top=0.9, bottom=0.1)
    fig.suptitle(data.title, fontsize=12)
    blocks, kinds, cells = module_grid(data.rows)
    ax = fig.add_subplot(gs[0, :])
    norm = Normalize(0.0, 1.0)
    if blocks:
        grid = np.full((len(kinds), len(blocks)), np.nan)
        for (block, kind), cell in cells.items():
            grid[kinds.index(kind), blocks.index(block)] = cell.phi
        cmap = _cmap()
        im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(blocks)), blocks, rotation=45 if len(blocks) > 12 else 0, ha="right" if len(blocks) > 12 else "center", fontsize=8)
        ax.set_yticks(range(len(kinds)), kinds, fontsize=8 if len(kinds) < 25 else 6)
        fig_h = REPORT_SIZE[1] * 0.8 * (1.15 / 2.15)  # heatmap height in pixels (gridspec share)
        row_px, col_px = fig_h / len(kinds), REPORT_SIZE[0] * 0.85 / len(blocks)
        annotate = row_px >= 11 and col_px >= 26
        two_lines = row_px >= 26
        for (block, kind), cell in cells.items():
            x, y = blocks.index(block), kinds.index(kind)
            done = sum(cell.passes)
            colour = PASS_COLOUR if done == len(cell.passes) else SKIP_COLOUR
            ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor=colour, linewidth=2.0 if done < len(cell.passes) else 1.0,
                                   hatch="//" if done == 0 else None))
            if annotate:
                text = "n/a" if math.isnan(cell.phi) else f"{cell.phi:.2f}"
                if two_lines and len(cell.passes) > 1:
                    text += f"\n{done}/{len(cell.passes)}"
                elif two_lines and done == 0:
                    text += "\nskip"
                shade = cmap(norm(cell.phi)) if not math.isnan(cell.phi) else (1, 1, 1, 1)
                light = 0.299 * shade[0] + 0.587 * shade[1] + 0.114 * shade[2] > 0.55
                ax.text(x, y, text, ha="center", va="center", fontsize=7, color="black" if light else "white")
        cbar = fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
        cbar.ax.axhline(data.threshold, color="black", linewidth=2)
        chances = [r["chance"] for r in data.rows if r["chance"] is not None]
        if chances:
            cbar.ax.axhline(max(chances), color="0.6", linewidth=2, linestyle=":")
        cbar.set_label("Φ = min(Φ_U, Φ_V); black: threshold, dotted: chance", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no modules matched", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_title("Φ per module over the model's blocks (green frame: transferred, red hatched frame: skipped)", fontsize=10)
    ax.set_xlabel("block")
    ax.set_ylabel("module kind")

    ordered = module_order(data.rows)
    ax2 = fig.add_subplot(gs[1, 0])
    xs = np.arange(len(ordered))
    phis = np.array([_phi(r) for r in ordered], dtype=float)
    chance = np.array([math.nan if r["chance"] is None else r["chance"] for r in ordered], dtype=float)
    passes = np.array([bool(r["passes"]) for r in ordered])
    if len(ordered):
        ax2.step(xs, chance, where="mid", color="0.45", linewidth=1.2, label="chance level k/d")
        ax2.scatter(xs[passes], phis[passes], color=PASS_COLOUR, s=18, label="transferred", zorder=3)
        ax2.scatter(xs[~passes], phis[~passes], color=SKIP_COLOUR, marker="x", s=22, label="skipped", zorder=3)
        starts = _block_starts(ordered)
        for i, (start, label) in enumerate(starts):
            if i:
                ax2.axvline(start - 0.5, color="0.85", linewidth=0.8)
        if len(starts) <= 24:
            ax2.set_xticks([(s + e) / 2 - 0.5 for (s, _), (e, _) in zip(starts, starts[1:] + [(len(ordered), "")])],
                           [lab for _, lab in starts], fontsize=7, rotation=45 if len(starts) > 8 else 0)
    ax2.axhline(data.threshold, color="black", linestyle="--", linewidth=1.2, label=f"threshold {data.threshold:g}")
    ax2.set_ylim(-0.03, 1.05)
    ax2.set_xlim(-0.8, max(len(ordered), 1) - 0.2)
    ax2.set_title("Φ per module (model order)", fontsize=10)
    ax2.set_ylabel("Φ = min(Φ_U, Φ_V)")
    ax2.legend(fontsize=7, loc="lower left")

    ax3 = fig.add_subplot(gs[1, 1])
    if data.norms:
        done = [n for n in data.norms if n["transferred"] and n["transferred_norm"] is not None]
        skipped = [n for n in data.norms if not n["transferred"]]
        top = max([n["source_norm"] for n in data.norms] + [n["transferred_norm"] for n in done] + [1e-12])
        ax3.plot([0, top * 1.05], [0, top * 1.05], color="0.5", linestyle="--", linewidth=1, label="y = x")
        if done:
            ax3.scatter([n["source_norm"] for n in done], [n["transferred_norm"] for n in done], color=PASS_COLOUR, s=20, label="transferred")
        if skipped:
            ax3.scatter([n["source_norm"] for n in skipped], [0.0] * len(skipped), color=SKIP_COLOUR, marker="x", s=22, label="skipped (0)")
        src = sum(n["source_norm"] ** 2 for n in done) ** 0.5
        dst = sum(n["transferred_norm"] ** 2 for n in done) ** 0.5
        ratio = f", overall ratio {dst / src:.3f}" if src else ""
        ax3.set_title(f"LoRA norm per module, mode {data.mode}{ratio}", fontsize=10)
        ax3.set_xlim(0, top * 1.05)
        ax3.set_ylim(-0.04 * top, top * 1.05)
        ax3.legend(fontsize=7, loc="upper left")
    else:
        ax3.text(0.5, 0.5, "connect a LoRA to the 'lora' input\nto plot source vs transferred norms", ha="center", va="center",
                 transform=ax3.transAxes, fontsize=9, color="0.35")
        ax3.set_title("LoRA norm per module", fontsize=10)
    ax3.set_xlabel("‖ΔW‖ source (Frobenius)")
    ax3.set_ylabel("‖ΔW‖ transferred")
    canvas.draw()
    return np.asarray(canvas.buffer_rgba()).copy()


def _cmap() -> Any:
    from matplotlib import colormaps

    return colormaps["viridis"].with_extremes(bad="#dddddd")


def _block_starts(ordered: Sequence[dict[str, Any]]) -> list[tuple[int, str]]:
    starts: list[tuple[int, str]] = []
    for i, r in enumerate(ordered):
        _, block, _ = split_key(r["part"], r["source"])
        if not starts or starts[-1][1] != block:
            starts.append((i, block))
    return starts


# A few viridis anchors for the PIL fallback.
_VIRIDIS = [(0.0, (68, 1, 84)), (0.25, (59, 82, 139)), (0.5, (33, 145, 140)), (0.75, (94, 201, 98)), (1.0, (253, 231, 37))]


def _viridis(v: float) -> tuple[int, int, int]:
    if math.isnan(v):
        return (221, 221, 221)
    v = min(1.0, max(0.0, v))
    for (a, ca), (b, cb) in zip(_VIRIDIS, _VIRIDIS[1:]):
        if v <= b:
            t = (v - a) / (b - a)
            return tuple(int(round(x + t * (y - x))) for x, y in zip(ca, cb))  # type: ignore[return-value]
    return _VIRIDIS[-1][1]


def _render_pil(data: ReportData) -> np.ndarray:
    """The same three panels drawn with PIL only (used when matplotlib is not installed)."""
    width, height = REPORT_SIZE
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    font = label_font(160)
    small = label_font(120)
    d.text((20, 12), data.title, fill="black", font=font)
    green, red = (44, 160, 44), (214, 39, 40)
    # heatmap
    blocks, kinds, cells = module_grid(data.rows)
    x0, y0, x1, y1 = 180, 60, width - 40, int(height * 0.5)
    d.text((x0, y0 - 20), "Phi = min(Phi_U, Phi_V) per block x module kind (green frame: transferred, red: skipped)", fill="black", font=small)
    if blocks:
        cw, ch = (x1 - x0) / len(blocks), (y1 - y0 - 30) / len(kinds)
        for (block, kind), cell in cells.items():
            cx, cy = x0 + blocks.index(block) * cw, y0 + kinds.index(kind) * ch
            box = [cx + 1, cy + 1, cx + cw - 1, cy + ch - 1]
            d.rectangle(box, fill=_viridis(cell.phi), outline=green if all(cell.passes) else red, width=2)
            if cw > 34 and ch > 12:
                text = "n/a" if math.isnan(cell.phi) else f"{cell.phi:.2f}"
                shade = _viridis(cell.phi)
                d.text((cx + 4, cy + 2), text, fill="black" if sum(shade) > 380 else "white", font=small)
        for i, kind in enumerate(kinds):
            d.text((10, y0 + i * ch + ch / 2 - 6), fit_text(small, kind, x0 - 16), fill="black", font=small)
        for i, block in enumerate(blocks):
            d.text((x0 + i * cw + 2, y1 - 24), fit_text(small, block, max(4, int(cw) - 2)), fill="black", font=small)
    # Φ strip with threshold and chance
    sx0, sy0, sx1, sy1 = 60, int(height * 0.58), int(width * 0.55), height - 50
    d.rectangle([sx0, sy0, sx1, sy1], outline="black")
    d.text((sx0, sy0 - 22), "Phi per module (model order); dashed: threshold, grey: chance k/d; green: transferred, red: skipped",
           fill="black", font=small)

    def ypos(v: float) -> float:
        return sy1 - v * (sy1 - sy0)

    ordered = module_order(data.rows)
    step = (sx1 - sx0) / max(len(ordered), 1)
    for x in range(sx0, sx1 - 6, 12):
        d.line([x, ypos(data.threshold), x + 6, ypos(data.threshold)], fill="black", width=2)
    for i, r in enumerate(ordered):
        cx = sx0 + (i + 0.5) * step
        if r["chance"] is not None:
            d.line([cx - step / 2, ypos(r["chance"]), cx + step / 2, ypos(r["chance"])], fill=(115, 115, 115), width=2)
        phi = _phi(r)
        if not math.isnan(phi):
            col = green if r["passes"] else red
            d.ellipse([cx - 4, ypos(phi) - 4, cx + 4, ypos(phi) + 4], fill=col)
    # norm scatter
    nx0, ny0, nx1, ny1 = int(width * 0.62), int(height * 0.58), width - 40, height - 50
    d.rectangle([nx0, ny0, nx1, ny1], outline="black")
    if data.norms:
        d.text((nx0, ny0 - 22), f"LoRA norm: source (x) vs transferred (y), mode {data.mode}", fill="black", font=small)
        top = max([n["source_norm"] for n in data.norms] + [n["transferred_norm"] or 0.0 for n in data.norms] + [1e-12]) * 1.05
        d.line([nx0, ny1, nx1, ny0], fill=(150, 150, 150), width=1)
        for n in data.norms:
            px = nx0 + n["source_norm"] / top * (nx1 - nx0)
            py = ny1 - (n["transferred_norm"] or 0.0) / top * (ny1 - ny0)
            d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=green if n["transferred"] else red)
    else:
        d.text((nx0 + 20, (ny0 + ny1) // 2), "connect a LoRA to plot source vs transferred norms", fill=(90, 90, 90), font=small)
    return np.asarray(img)


class ReportImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}ReportImage", display_name="Match Report Image (ProLoRA)", category=CATEGORY, is_output_node=True,
            description="Draws a match as a picture: Φ per module as a heatmap over the model's blocks (transferred vs skipped), Φ per "
                        "module against the threshold and the chance level, and, with a LoRA connected, each module's norm before vs "
                        "after the projection (paper Fig. 8).",
            inputs=[
                Match.Input("match", tooltip="From Match Modules."),
                LoraModelType.Input("lora", optional=True, tooltip="Optional: the source LoRA. When connected, it is projected exactly as "
                                    "Project LoRA does (same match, the mode below) to plot source vs transferred norms."),
                io.Combo.Input("mode", options=list(MODES), default=DEFAULT_MODE, tooltip="Projection mode for the norm plot (only used with "
                               "a LoRA); pick the one your Project LoRA node uses."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The report picture, one image [1, 1000, 1400, 3].")],
        )

    @classmethod
    def execute(cls, match: Any, mode: str = DEFAULT_MODE, lora: Any = None) -> io.NodeOutput:
        image = render_report(report_data(match, lora, mode))
        return io.NodeOutput(image, ui=ui.PreviewImage(image, cls=cls))


NODES: list[type[io.ComfyNode]] = [Compare, ReportImage]
