"""The linear modules of the SDXL UNet's transformer blocks, with their real shapes.

SDXL (``transformer_depth`` [0, 2, 10] per level, context dim 2048) has a ``SpatialTransformer``
after the ResBlock of input blocks 4, 5 (depth 2, 640 channels), 7, 8 (depth 10, 1280), the middle
block (depth 10, 1280) and output blocks 0, 1, 2 (depth 10, 1280), 3, 4, 5 (depth 2, 640). Each
``BasicTransformerBlock`` holds 10 linear layers (``attn1``/``attn2`` ``to_q``, ``to_k``, ``to_v``,
``to_out.0``; ``ff.net.0.proj`` GEGLU ``[2·4·dim, dim]``; ``ff.net.2`` ``[dim, 4·dim]``), each
``SpatialTransformer`` two more (``proj_in``/``proj_out``, linear in SDXL). Shapes are
``[out, in]`` as stored in a checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass

CONTEXT_DIM = 2048
#: (LDM block prefix, channels, transformer depth)
SDXL_TRANSFORMERS: tuple[tuple[str, int, int], ...] = (
    ("input_blocks.4.1", 640, 2), ("input_blocks.5.1", 640, 2),
    ("input_blocks.7.1", 1280, 10), ("input_blocks.8.1", 1280, 10),
    ("middle_block.1", 1280, 10),
    ("output_blocks.0.1", 1280, 10), ("output_blocks.1.1", 1280, 10), ("output_blocks.2.1", 1280, 10),
    ("output_blocks.3.1", 640, 2), ("output_blocks.4.1", 640, 2), ("output_blocks.5.1", 640, 2),
)


@dataclass(frozen=True)
class Module:
    name: str  # bare LDM module name, e.g. ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``
    shape: tuple[int, int]  # [out, in]

    @property
    def weight_key(self) -> str:
        return f"model.diffusion_model.{self.name}.weight"


def block_modules(prefix: str, dim: int) -> list[Module]:
    """The 10 linear layers of one ``BasicTransformerBlock`` of width ``dim``."""
    out = []
    for attn in ("attn1", "attn2"):
        ctx = dim if attn == "attn1" else CONTEXT_DIM
        out += [Module(f"{prefix}.{attn}.to_q", (dim, dim)), Module(f"{prefix}.{attn}.to_k", (dim, ctx)),
                Module(f"{prefix}.{attn}.to_v", (dim, ctx)), Module(f"{prefix}.{attn}.to_out.0", (dim, dim))]
    out += [Module(f"{prefix}.ff.net.0.proj", (8 * dim, dim)), Module(f"{prefix}.ff.net.2", (dim, 4 * dim))]
    return out


def transformer_modules(prefix: str, dim: int, depth: int) -> list[Module]:
    mods = [Module(f"{prefix}.proj_in", (dim, dim))]
    for d in range(depth):
        mods += block_modules(f"{prefix}.transformer_blocks.{d}", dim)
    mods.append(Module(f"{prefix}.proj_out", (dim, dim)))
    return mods


def sdxl_modules() -> list[Module]:
    """All 722 linear modules of SDXL's transformer blocks (70 blocks × 10 + 11 × proj_in/out)."""
    mods: list[Module] = []
    for prefix, dim, depth in SDXL_TRANSFORMERS:
        mods += transformer_modules(prefix, dim, depth)
    return mods


def ci_modules() -> list[Module]:
    """A 22-module SDXL slice: one 640-wide transformer (its first block and proj_in/out) and one
    1280-wide block: 640×640, 640×2048, 5120×640, 640×2560, 1280×1280, 1280×2048, 10240×1280, 1280×5120."""
    mods = [Module("input_blocks.4.1.proj_in", (640, 640))]
    mods += block_modules("input_blocks.4.1.transformer_blocks.0", 640)
    mods.append(Module("input_blocks.4.1.proj_out", (640, 640)))
    mods += block_modules("input_blocks.7.1.transformer_blocks.0", 1280)
    return mods


def describe(scale: str) -> str:
    """How the module count of a scale is made up (printed with the results)."""
    mods = modules_for(scale)
    if scale == "sdxl":
        blocks = sum(depth for _, _, depth in SDXL_TRANSFORMERS)
        gib = 2 * sum(m.shape[0] * m.shape[1] for m in mods) / 2**30
        return (f"{len(mods)} modules = {blocks} BasicTransformerBlocks × 10 linear layers + {len(SDXL_TRANSFORMERS)} SpatialTransformers × "
                f"proj_in/proj_out (transformer_depth [0, 2, 10]; {gib:.2f} GiB per model in fp16)")
    return f"{len(mods)} modules (an SDXL slice: input_blocks.4.1 proj_in/proj_out + its block 0, input_blocks.7.1 block 0)"


def modules_for(scale: str) -> list[Module]:
    if scale == "ci":
        return ci_modules()
    if scale == "sdxl":
        return sdxl_modules()
    raise ValueError(f"unknown scale {scale!r}")
