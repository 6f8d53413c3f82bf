"""**Match Report Image**: a match drawn as one picture — Φ per module as a heatmap over the
model's blocks, Φ per module against the threshold and the chance level, and, with Project LoRA's
output connected, each module's norm before vs after the projection that was actually made
(paper Fig. 8). Drawn with matplotlib (a requirement of the pack)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from comfy_api.latest import io, ui
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..prolora_core.errors import ProLoRAError
from ..prolora_core.report import overall_norm_ratio
from .blocks import module_grid, module_order, split_key
from .transfer_nodes import CATEGORY, PREFIX, LoraModelType, Match

PASS_COLOUR = "#2ca02c"
SKIP_COLOUR = "#d62728"
REPORT_SIZE = (1400, 1000)


@dataclass
class ReportData:
    """Everything the Report picture shows."""

    title: str
    threshold: float
    rows: list[dict[str, Any]]
    norms: list[dict[str, Any]] | None  # per LoRA module: source, source_norm, transferred_norm, transferred
    projection: str | None = None  # the options of the projection the norms are of, e.g. "mode prolora, out_rank 8, rescaled"
    norm_ratio: float | None = None  # ‖ΔW‖ transferred / source over the transferred modules (Project LoRA's report line)


def _projection_options(meta: dict[str, str]) -> str:
    text = f"mode {meta.get('prolora.mode', '?')}"
    if meta.get("prolora.out_rank", "none") != "none":
        text += f", out_rank {meta['prolora.out_rank']}"
        if "prolora.energy_dropped" in meta:
            text += f" ({1.0 - float(meta['prolora.energy_dropped']):.1%} of the energy kept)"
    if meta.get("prolora.rescale_to_source_norm") == "true":
        text += ", rescaled to source norm"
    return text


def report_data(match: Any, projected: Any = None) -> ReportData:
    """Rows of the match and — with Project LoRA's output ``projected`` — the per-module norms of the
    projection Project LoRA made (its mode, out_rank and rescale), taken from that output, never
    recomputed.

    Raises ProLoRAError when ``projected`` was not made by Project LoRA, or from another match's bases.
    """
    norms = options = ratio = None
    if projected is not None:
        modules = getattr(projected, "projection", None)
        meta = getattr(projected, "metadata", {}) or {}
        if modules is None:
            raise ProLoRAError("the report's 'lora' input takes the LoRA Project LoRA made (its 'lora' output), so that the norm plot "
                               "shows the projection that was made; this LORA_MODEL does not come from Project LoRA",
                               file=getattr(projected, "source_file", None) or "<LORA_MODEL>")
        made = (meta.get("prolora.source_base"), meta.get("prolora.target_base"))
        if made != (match.source.label, match.target.label):
            raise ProLoRAError(f"the LoRA was projected from {made[0]} to {made[1]}, but the match is {match.source.label} → "
                               f"{match.target.label}; connect the same match to Project LoRA and to the report", file="<LORA_MODEL>")
        norms = [{"source": m.source_key or m.lora, "source_norm": float(m.source_norm),
                  "transferred_norm": None if m.transferred_norm is None else float(m.transferred_norm), "transferred": bool(m.transferred)}
                 for m in modules]
        options, ratio = _projection_options(meta), overall_norm_ratio(modules)
    rows = match.rows()
    passing = sum(r["passes"] for r in rows)
    title = (f"ProLoRA match {match.source.label} -> {match.target.label}: {passing}/{len(rows)} modules pass "
             f"threshold {match.config.threshold:g} (pairing {match.config.pairing})")
    return ReportData(title=title, threshold=float(match.config.threshold), rows=rows, norms=norms, projection=options, norm_ratio=ratio)


def _phi(r: dict[str, Any]) -> float:
    return math.nan if r["phi_u"] is None or r["phi_v"] is None else min(r["phi_u"], r["phi_v"])


def render_report(data: ReportData) -> torch.Tensor:
    """The report picture as an IMAGE ``[1, H, W, 3]`` float32 in [0, 1] (``REPORT_SIZE`` = W × H)."""
    pixels = _draw(data)
    return torch.from_numpy(np.ascontiguousarray(pixels[..., :3], dtype=np.float32) / 255.0).unsqueeze(0)


def _draw(data: ReportData) -> np.ndarray:
    """The three panels as an RGBA array ``[H, W, 4]`` uint8 (matplotlib's Agg canvas)."""
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
        ratio = f", overall ratio {data.norm_ratio:.3f}" if data.norm_ratio is not None else ""
        ax3.set_title(f"LoRA norm per module, {data.projection}{ratio}", fontsize=10)
        ax3.set_xlim(0, top * 1.05)
        ax3.set_ylim(-0.04 * top, top * 1.05)
        ax3.legend(fontsize=7, loc="upper left")
    else:
        ax3.text(0.5, 0.5, "connect Project LoRA's output to the 'lora' input\nto plot source vs transferred norms", ha="center", va="center",
                 transform=ax3.transAxes, fontsize=9, color="0.35")
        ax3.set_title("LoRA norm per module", fontsize=10)
    ax3.set_xlabel("‖ΔW‖ source (Frobenius)")
    ax3.set_ylabel("‖ΔW‖ transferred")
    canvas.draw()
    return np.asarray(canvas.buffer_rgba()).copy()


def _cmap() -> Any:
    return colormaps["viridis"].with_extremes(bad="#dddddd")


def _block_starts(ordered: Sequence[dict[str, Any]]) -> list[tuple[int, str]]:
    starts: list[tuple[int, str]] = []
    for i, r in enumerate(ordered):
        _, block, _ = split_key(r["part"], r["source"])
        if not starts or starts[-1][1] != block:
            starts.append((i, block))
    return starts


class ReportImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}ReportImage", display_name="Match Report Image (ProLoRA)", category=CATEGORY, is_output_node=True,
            description="Draws a match as a picture: Φ per module as a heatmap over the model's blocks (transferred vs skipped), Φ per "
                        "module against the threshold and the chance level, and, with Project LoRA's output connected, each module's "
                        "norm before vs after the projection Project LoRA made (paper Fig. 8).",
            inputs=[
                Match.Input("match", tooltip="From Match Modules."),
                LoraModelType.Input("lora", optional=True, tooltip="Optional: the transferred LoRA, i.e. Project LoRA's 'lora' output. The norm "
                                    "plot shows that very projection (its mode, out_rank and rescale); nothing is projected again."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip=f"The report picture, one image [1, {REPORT_SIZE[1]}, {REPORT_SIZE[0]}, 3].")],
        )

    @classmethod
    def execute(cls, match: Any, lora: Any = None) -> io.NodeOutput:
        image = render_report(report_data(match, lora))
        return io.NodeOutput(image, ui=ui.PreviewImage(image, cls=cls))


NODES: list[type[io.ComfyNode]] = [ReportImage]
