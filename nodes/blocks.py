"""Grouping a model's weights by block, for the match report picture and the Match Modules web
panel (the panel gets the grouping in its UI payload, :func:`with_blocks`; it does not regroup)."""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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
    """The modules of one (block, kind): their Φ = min(Φ_U, Φ_V) and whether each passes."""

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


def with_blocks(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The match rows (``MatchHandle.rows()``) in their original order, each with ``block`` (its
    label, e.g. "in 4") and ``order`` (its position in model order, 0-based) added: what the web
    panel draws its strip from."""
    position = {id(r): i for i, r in enumerate(module_order(rows))}
    return [{**r, "block": split_key(r["part"], r["source"])[1], "order": position[id(r)]} for r in rows]
