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

import json
from dataclasses import dataclass
from pathlib import Path

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


def sdxl_part_modules() -> list[Module]:
    """314 of SDXL's 722 modules: every 640-wide transformer (5 × depth 2) and the 1280-wide ones of
    input blocks 7 and 8 (depth 10): all eight shapes, 204 modules of the 1280-wide shapes."""
    mods: list[Module] = []
    for prefix, dim, depth in SDXL_TRANSFORMERS:
        if dim == 640 or prefix in ("input_blocks.7.1", "input_blocks.8.1"):
            mods += transformer_modules(prefix, dim, depth)
    return mods


LAYOUTS = Path(__file__).with_name("layouts.json")
#: ComfyUI's classes and the parameters it detects for each family (comfy/model_detection.py)
FAMILIES = {
    "flux-dev": ("comfy.ldm.flux.model", "Flux", dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                                                       hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38,
                                                       axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)),
    "wan-14b": ("comfy.ldm.wan.model", "WanModel", dict(model_type="t2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, text_dim=4096,
                                                         in_dim=16, out_dim=16)),
}
#: the repeated blocks of each family, and the first block of each kind (the subset the CPU run generates)
BLOCKS = {"flux-dev": (("double_blocks.", 19), ("single_blocks.", 38)), "wan-14b": (("blocks.", 40),)}


def refresh_layouts() -> dict[str, list[list]]:
    """Every ≥ 2-D ``.weight`` of each family with its shape, from ComfyUI's own classes built on the
    meta device (no memory, no weights), written to ``bench/layouts.json`` (so that a machine
    without ComfyUI, e.g. the GPU one, runs from the file). Needs the ComfyUI host (``prolora_dev.host``)."""
    import importlib

    from prolora_dev.host import configure_host

    configure_host()  # ComfyUI first on sys.path, CPU mode
    import comfy.ops

    out = {}
    for family, (module, cls, params) in FAMILIES.items():
        model = getattr(importlib.import_module(module), cls)(device="meta", operations=comfy.ops.disable_weight_init, **params)
        out[family] = [[k, list(p.shape)] for k, p in model.named_parameters() if k.endswith(".weight") and p.ndim >= 2]
    LAYOUTS.write_text(json.dumps({"source": "ComfyUI 0.3.75 classes on the meta device (bench/shapes.py FAMILIES)", **out}, indent=0))
    return out


def layout(family: str) -> list[tuple[str, tuple[int, ...]]]:
    """``(parameter name, shape)`` of every ≥ 2-D weight of ``family`` (from ``bench/layouts.json``)."""
    data = json.loads(LAYOUTS.read_text())
    return [(k, tuple(s)) for k, s in data[family]]


def block_layout(family: str) -> list[tuple[str, tuple[int, ...]]]:
    """The 2-D weights of the family's repeated blocks (what LoRAs touch)."""
    prefixes = tuple(p for p, _ in BLOCKS[family])
    return [(k, s) for k, s in layout(family) if k.startswith(prefixes) and len(s) == 2]


def subset_modules(family: str) -> list[Module]:
    """The 2-D weights of the first block of each kind (``double_blocks.0``, ``single_blocks.0``; ``blocks.0``)."""
    firsts = tuple(f"{p}0." for p, _ in BLOCKS[family])
    return [Module(k.removesuffix(".weight"), s) for k, s in block_layout(family) if k.startswith(firsts)]  # type: ignore[arg-type]


def describe_scale(scale: str) -> str:
    """A short description of a scale's modules (for the tables)."""
    mods = modules_for(scale)
    gib = 2 * sum(m.shape[0] * m.shape[1] for m in mods) / 2**30
    if scale in FAMILIES:
        blocks = block_layout(scale)
        kinds = ", ".join(f"{n} × {p.rstrip('.')}" for p, n in BLOCKS[scale])
        return (f"{len(blocks)} block weights in {kinds} ({2 * sum(m * n for _, (m, n) in blocks) / 2**30:.1f} GiB fp16); "
                f"generated: {len(mods)} weights of the first block of each kind ({gib:.2f} GiB per model)")
    return f"{len(mods)} modules ({gib:.2f} GiB per model in fp16)"


def modules_for(scale: str) -> list[Module]:
    if scale == "ci":
        return ci_modules()
    if scale == "sdxl":
        return sdxl_modules()
    if scale == "sdxl-part":
        return sdxl_part_modules()
    if scale in FAMILIES:
        return subset_modules(scale)
    raise ValueError(f"unknown scale {scale!r}")
