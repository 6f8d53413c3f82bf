"""**Compare**: a labelled grid of up to six image branches (branches as columns, batch items as
rows), pairwise distances between the branches, and the images the web panel's side-by-side
slider shows. Only drawing and simple image statistics live here."""
from __future__ import annotations

import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from comfy_api.latest import io, ui
from PIL import Image, ImageDraw, ImageFont

from .transfer_nodes import CATEGORY, PREFIX

MAX_BRANCHES = 6
#: Largest cell side of the Compare grid; bigger inputs are scaled down to it.
MAX_CELL_SIDE = 2048
BACKGROUND = (0.13, 0.13, 0.13)
GAP = 4
HIST_BINS = 16
STRUCTURE_SIZE = 64

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


NODES: list[type[io.ComfyNode]] = [Compare]
