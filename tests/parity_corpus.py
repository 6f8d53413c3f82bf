"""A corpus of LoRA files in every layout ComfyUI 0.3.75 applies, on the tiny SD1.5-shaped model
(``comfy_host.tiny_sd15_model`` + ``comfy_host.tiny_clip``).

Each :class:`Case` is a real state dict as a trainer writes it, plus what the file holds that a
faithful reader must *not* apply: keys ComfyUI's ``load_lora`` does not read (``unused``) and
module names ComfyUI's key maps do not know for this model (``unmapped``). Names are taken from
ComfyUI's own key maps (``comfy.lora.model_lora_keys_unet/clip``) and diffusers' UNet naming
(``comfy.utils.unet_to_diffusers``), so each spelling is one ComfyUI really maps.

Modules touched (few per file so the whole corpus runs in seconds): attention projections
(32×32), ``ff.net.0.proj`` (256×32), ``proj_in`` (1×1 conv), ``conv_in`` [32, 4, 3, 3],
``conv_out`` [4, 32, 3, 3], a ResNet 3×3 conv, ``time_embed.0`` [128, 32], and the text encoder's
``q_proj`` / ``mlp.fc1``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

Tensor = torch.Tensor

# LDM names of the UNet modules (``diffusion_model.<name>.weight``).
BLOCK = "input_blocks.1.1.transformer_blocks.0"
Q, OUT, K2, FF0 = f"{BLOCK}.attn1.to_q", f"{BLOCK}.attn1.to_out.0", f"{BLOCK}.attn2.to_k", f"{BLOCK}.ff.net.0.proj"
PROJ_IN, CONV_IN, CONV_OUT, RES, TIME = "input_blocks.1.1.proj_in", "input_blocks.0.0", "out.2", "input_blocks.1.0.in_layers.2", "time_embed.0"
NORM = f"{BLOCK}.norm1"
# Text encoder (clip_l) modules, by their HF name below ``text_model.encoder.layers.0``.
TE_Q, TE_FC1 = "self_attn.q_proj", "mlp.fc1"
TE_KOHYA = {TE_Q: "self_attn_q_proj", TE_FC1: "mlp_fc1"}


@dataclass(frozen=True)
class Case:
    """One LoRA file of the corpus.

    ``unused``: keys ComfyUI does not read; ``unmapped``: module names its key maps lack for the
    tiny SD1.5 model; ``refactored``: module names whose prolora-full output is a re-factored
    LoHa/LoKr (≥ 99.9 % of the energy, so the change agrees to √0.001); ``tol``: relative error
    allowed on a weight's change for target = source (set by the file's dtype)."""

    name: str
    tensors: dict[str, Tensor]
    unused: frozenset[str] = frozenset()
    unmapped: frozenset[str] = frozenset()
    refactored: frozenset[str] = frozenset()
    tol: float = 1e-4
    metadata: dict[str, str] = field(default_factory=dict)


class Names:
    """Module names of the tiny model in each spelling ComfyUI maps."""

    def __init__(self, model: Any) -> None:
        import comfy.utils

        diffusers = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
        self._to_diffusers = {v.removesuffix(".weight"): k.removesuffix(".weight") for k, v in diffusers.items() if k.endswith(".weight")}

    def native(self, m: str) -> str:
        return f"diffusion_model.{m}"

    def kohya(self, m: str) -> str:
        return "lora_unet_" + m.replace(".", "_")

    def diffusers(self, m: str) -> str:
        """diffusers' UNet name (``down_blocks.0.attentions.0.proj_in``)."""
        return self._to_diffusers[m]

    def kohya_diffusers(self, m: str) -> str:
        return "lora_unet_" + self.diffusers(m).replace(".", "_")

    def lycoris(self, m: str) -> str:
        return "lycoris_" + self.diffusers(m).replace(".", "_")

    def processor(self, m: str, prefix: str = "unet.") -> str:
        """diffusers' legacy attention-processor module (``…attn1.processor.to_q``)."""
        name = self.diffusers(m).replace(".to_", ".processor.to_")
        return prefix + name.removesuffix(".0") if name.endswith(".to_out.0") else prefix + name

    @staticmethod
    def te(m: str, style: str) -> str:
        if style == "native":
            return f"text_encoders.clip_l.transformer.text_model.encoder.layers.0.{m}"
        if style == "diffusers":
            return f"text_encoder.text_model.encoder.layers.0.{m}"
        return f"{style}text_model_encoder_layers_0_{TE_KOHYA[m]}"  # lora_te_ / lora_te1_


class Maker:
    """Random adapter tensors for the tiny model's weights (seeded; entries ~ N(0, 0.3²))."""

    def __init__(self, model: Any, clip: Any, seed: int) -> None:
        self.shapes = {k.removeprefix("diffusion_model.").removesuffix(".weight"): tuple(v.shape)
                       for k, v in model.model.state_dict().items() if k.endswith(".weight")}
        for k, v in clip.cond_stage_model.state_dict().items():
            if k.startswith("clip_l.transformer.text_model.encoder.layers.0.") and k.endswith(".weight"):
                self.shapes["te." + k.split("layers.0.", 1)[1].removesuffix(".weight")] = tuple(v.shape)
        self.gen = torch.Generator().manual_seed(seed)
        self.sd = model.model.state_dict()

    def t(self, *shape: int, scale: float = 0.3) -> Tensor:
        return scale * torch.randn(shape, generator=self.gen)

    def factors(self, module: str, rank: int, *, conv_as_linear: bool = False) -> tuple[Tensor, Tensor]:
        """(up, down) for ``module``: linear ``[m, r]``/``[r, n]``, conv ``[out, r, 1, 1]``/``[r, in, kh, kw]``
        (``conv_as_linear``: 2-D ``[out, r]``/``[r, in·kh·kw]``, which ComfyUI reshapes)."""
        shape = self.shapes[module]
        if len(shape) == 4 and not conv_as_linear:
            return self.t(shape[0], rank, 1, 1), self.t(rank, *shape[1:])
        return self.t(shape[0], rank), self.t(rank, int(torch.tensor(shape[1:]).prod()))

    def lora(self, name: str, module: str, rank: int, up_s: str = ".lora_up.weight", down_s: str = ".lora_down.weight",
             alpha: Tensor | None = None, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        up, down = self.factors(module, rank)
        out = {name + up_s: up.to(dtype), name + down_s: down.to(dtype)}
        if alpha is not None:
            out[f"{name}.alpha"] = alpha
        return out

    def magnitude(self, module: str) -> Tensor:
        """A trained-looking DoRA magnitude: the weight's row norms changed by ±10 %, ``[out, 1, …]``."""
        w = self.sd[f"diffusion_model.{module}.weight"].float()
        n = w.reshape(w.shape[0], -1).norm(dim=1)
        return (n * (1 + 0.1 * torch.randn(n.shape, generator=self.gen))).reshape(w.shape[0], *([1] * (w.ndim - 1)))


def build_corpus(model: Any, clip: Any) -> list[Case]:
    """Every case of the corpus (see the module docstring)."""
    n, mk = Names(model), Maker(model, clip, seed=11)
    te = lambda m: "te." + m  # noqa: E731 (shape lookups of text-encoder modules)
    cases: list[Case] = []

    def lora_te(name: str, m: str, up_s: str = ".lora_up.weight", down_s: str = ".lora_down.weight",
                alpha: Tensor | None = None) -> dict[str, Tensor]:
        return mk.lora(name, te(m), 4, up_s, down_s, alpha)

    a0 = lambda v: torch.tensor(float(v))  # noqa: E731  0-d float alpha
    a1 = lambda v: torch.tensor([float(v)])  # noqa: E731  1-d alpha
    ai = lambda v: torch.tensor(int(v))  # noqa: E731  int alpha

    # kohya, LDM names; alpha 0-d; linear, 1×1 conv, 3×3 LoCon (conv_in) and the time embedding.
    t = {**mk.lora(n.kohya(Q), Q, 4, alpha=a0(2)), **mk.lora(n.kohya(PROJ_IN), PROJ_IN, 2, alpha=a0(1)),
         **mk.lora(n.kohya(CONV_IN), CONV_IN, 4, alpha=a0(4)), **mk.lora(n.kohya(TIME), TIME, 4, alpha=a0(8)),
         **lora_te(n.te(TE_Q, "lora_te_"), TE_Q, alpha=a0(4))}
    cases.append(Case("kohya-ldm", t))
    # kohya, diffusers-style names; alpha 1-d; lora_te1_.
    t = {**mk.lora(n.kohya_diffusers(OUT), OUT, 4, alpha=a1(4)), **mk.lora(n.kohya_diffusers(FF0), FF0, 3, alpha=a1(1.5)),
         **mk.lora(n.kohya_diffusers(CONV_OUT), CONV_OUT, 2, alpha=a1(2)), **lora_te(n.te(TE_FC1, "lora_te1_"), TE_FC1, alpha=a1(2))}
    cases.append(Case("kohya-diffusers", t))
    # PEFT, no adapter name, no alpha. ComfyUI's SD1.5 key map has diffusers names only where no
    # ".to_" is in them without the legacy ".processor": attn1.to_q is not applied.
    peft = (".lora_B.weight", ".lora_A.weight")
    t = {**mk.lora(n.diffusers(PROJ_IN), PROJ_IN, 2, *peft), **mk.lora(n.diffusers(FF0), FF0, 4, *peft),
         **mk.lora(n.diffusers(Q), Q, 4, *peft), **lora_te(n.te(TE_Q, "diffusers"), TE_Q, *peft)}
    cases.append(Case("peft", t, unmapped=frozenset({n.diffusers(Q)})))
    # PEFT with its adapter name "default" (4-D 1×1 proj_in), as in the issue.
    named = (".lora_B.default.weight", ".lora_A.default.weight")
    t = {**mk.lora(n.diffusers(PROJ_IN), PROJ_IN, 4, *named), **mk.lora(n.diffusers(FF0), FF0, 4, *named),
         **mk.lora(n.diffusers(Q), Q, 4, *named)}
    cases.append(Case("peft-default", t, unmapped=frozenset({n.diffusers(Q)})))
    # PEFT with base_model.model. (not in SD1.5's key map), another adapter name, and unet.-prefixed
    # modules ComfyUI does apply.
    t = {**mk.lora("base_model.model." + n.diffusers(PROJ_IN), PROJ_IN, 4, *named),
         **mk.lora(n.diffusers(FF0), FF0, 4, ".lora_B.style.weight", ".lora_A.style.weight"),
         **mk.lora("unet." + n.diffusers(CONV_OUT), CONV_OUT, 2, *peft), **mk.lora("unet." + n.diffusers(TIME), TIME, 4, *named)}
    style = {f"{n.diffusers(FF0)}.lora_B.style.weight", f"{n.diffusers(FF0)}.lora_A.style.weight"}
    cases.append(Case("peft-prefixed", t, unused=frozenset(style), unmapped=frozenset({"base_model.model." + n.diffusers(PROJ_IN)})))
    # diffusers .lora.up/.lora.down with unet./text_encoder. prefixes.
    dif = (".lora.up.weight", ".lora.down.weight")
    t = {**mk.lora("unet." + n.diffusers(PROJ_IN), PROJ_IN, 4, *dif, alpha=a0(2)), **mk.lora("unet." + n.diffusers(TIME), TIME, 2, *dif),
         **lora_te(n.te(TE_FC1, "diffusers"), TE_FC1, *dif)}
    cases.append(Case("diffusers-lora-up", t))
    # diffusers' legacy attention processors + a transformers-style text-encoder module, no alpha (issue failure 2).
    leg = ("_lora.up.weight", "_lora.down.weight")
    t = {**mk.lora(n.processor(Q), Q, 4, *leg), **mk.lora(n.processor(OUT), OUT, 4, *leg), **mk.lora(n.processor(K2), K2, 4, *leg),
         **lora_te(n.te(TE_Q, "diffusers"), TE_Q, ".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight")}
    cases.append(Case("diffusers-processor", t))
    # ComfyUI-native names, int alpha, mixed dtypes (bf16 up with fp16 down; fp32 text encoder).
    t = {**mk.lora(n.native(Q), Q, 4, alpha=ai(4), dtype=torch.bfloat16),
         **mk.lora(n.native(CONV_OUT), CONV_OUT, 2, alpha=ai(1), dtype=torch.float16),
         **lora_te(n.te(TE_Q, "native"), TE_Q, alpha=ai(2))}
    cases.append(Case("native-mixed-dtypes", t, tol=1e-2))
    # bf16 throughout (the output keeps bf16).
    t = {**mk.lora(n.kohya(Q), Q, 4, alpha=a0(4), dtype=torch.bfloat16), **mk.lora(n.kohya(CONV_IN), CONV_IN, 4, alpha=a0(4), dtype=torch.bfloat16)}
    cases.append(Case("kohya-bf16", t, tol=2e-2))
    # Factor layouts ComfyUI reshapes: 2-D factors on a 3×3 conv (up [32, r], down [r, 4·3·3]), 4-D 1×1 factors on a linear weight.
    up, down = mk.factors(CONV_IN, 4, conv_as_linear=True)
    t = {f"{n.kohya(CONV_IN)}.lora_up.weight": up, f"{n.kohya(CONV_IN)}.lora_down.weight": down,
         f"{n.kohya(Q)}.lora_up.weight": mk.t(32, 4, 1, 1), f"{n.kohya(Q)}.lora_down.weight": mk.t(4, 32, 1, 1), f"{n.kohya(Q)}.alpha": a0(2)}
    cases.append(Case("flattened-factor-layouts", t))
    # Rank above min(m, n) (issue failure 1): rank 40 on a 32×32 to_q, LoCon rank 8 on conv_out [4, 32, 3, 3].
    t = {**mk.lora(n.kohya(Q), Q, 40, alpha=a0(40)), **mk.lora(n.kohya(CONV_OUT), CONV_OUT, 8, alpha=a0(4))}
    cases.append(Case("rank-above-min", t))
    # LyCORIS LoCon with a Tucker core (3×3 ResNet conv), simpletuner lycoris_ names.
    up, down = mk.t(mk.shapes[RES][0], 3, 1, 1), mk.t(3, mk.shapes[RES][1], 1, 1)
    t = {f"{n.lycoris(RES)}.lora_up.weight": up, f"{n.lycoris(RES)}.lora_down.weight": down,
         f"{n.lycoris(RES)}.lora_mid.weight": mk.t(3, 3, 3, 3), f"{n.lycoris(RES)}.alpha": a0(2),
         **mk.lora(n.lycoris(PROJ_IN), PROJ_IN, 2, alpha=a0(2))}
    cases.append(Case("lycoris-locon-tucker", t))
    # LoHa (linear and 3×3 conv, flattened as LyCORIS writes non-Tucker conv LoHa).
    t = {}
    for m in (Q, CONV_IN):
        rows, cols = mk.shapes[m][0], int(torch.tensor(mk.shapes[m][1:]).prod())
        k = n.kohya(m)
        t.update({f"{k}.hada_w1_a": mk.t(rows, 2), f"{k}.hada_w1_b": mk.t(2, cols), f"{k}.hada_w2_a": mk.t(rows, 2),
                  f"{k}.hada_w2_b": mk.t(2, cols), f"{k}.alpha": a0(2)})
    cases.append(Case("loha", t, refactored=frozenset({n.kohya(Q), n.kohya(CONV_IN)})))
    # LoKr: both sides whole (to_q), both factored with alpha (ff.net.0.proj 256×32 = 16×8 ⊗ 16×4), 4-D w2 (conv_in).
    t = {f"{n.kohya(Q)}.lokr_w1": mk.t(4, 4), f"{n.kohya(Q)}.lokr_w2": mk.t(8, 8),
         f"{n.kohya(FF0)}.lokr_w1_a": mk.t(16, 2), f"{n.kohya(FF0)}.lokr_w1_b": mk.t(2, 8), f"{n.kohya(FF0)}.lokr_w2_a": mk.t(16, 2),
         f"{n.kohya(FF0)}.lokr_w2_b": mk.t(2, 4), f"{n.kohya(FF0)}.alpha": a0(1),
         f"{n.kohya(CONV_IN)}.lokr_w1": mk.t(4, 2), f"{n.kohya(CONV_IN)}.lokr_w2": mk.t(8, 2, 3, 3)}
    cases.append(Case("lokr", t, refactored=frozenset({n.kohya(Q), n.kohya(FF0), n.kohya(CONV_IN)})))
    # LyCORIS Tucker (CP) variants: LoHa with hada_t1/t2 on conv_in (w_a [r, out], w_b [r, in]), and LoKr
    # with a factored w2 and lokr_t2 on a 3×3 ResNet conv ([32, 32, 3, 3] = [4, 4] ⊗ [8, 8, 3, 3]), which
    # ComfyUI 0.3.75 fails to apply (it logs an error and leaves the weight as it is).
    k, c = n.kohya(CONV_IN), n.kohya(RES)
    t = {f"{k}.hada_w1_a": mk.t(2, 32), f"{k}.hada_w1_b": mk.t(2, 4), f"{k}.hada_t1": mk.t(2, 2, 3, 3),
         f"{k}.hada_w2_a": mk.t(2, 32), f"{k}.hada_w2_b": mk.t(2, 4), f"{k}.hada_t2": mk.t(2, 2, 3, 3), f"{k}.alpha": a0(1),
         f"{c}.lokr_w1": mk.t(4, 4), f"{c}.lokr_w2_a": mk.t(2, 8), f"{c}.lokr_w2_b": mk.t(2, 8), f"{c}.lokr_t2": mk.t(2, 2, 3, 3),
         f"{c}.alpha": a0(1)}
    lokr_keys = frozenset(key for key in t if key.startswith(c + "."))  # ComfyUI 0.3.75 fails on lokr_t2: nothing applied
    cases.append(Case("lycoris-tucker-loha-lokr", t, unused=lokr_keys, refactored=frozenset({k})))
    # DoRA: LoRA + magnitude on a linear and on a 1×1 conv weight.
    t = {**mk.lora(n.kohya(Q), Q, 4, alpha=a0(4)), f"{n.kohya(Q)}.dora_scale": mk.magnitude(Q),
         **mk.lora(n.kohya(PROJ_IN), PROJ_IN, 2, alpha=a0(2)), f"{n.kohya(PROJ_IN)}.dora_scale": mk.magnitude(PROJ_IN)}
    cases.append(Case("dora", t))
    # Full differences and 1-D parts: .diff on the time embedding (with .diff_b), norm w_norm/b_norm.
    t = {f"{n.native(TIME)}.diff": mk.t(*mk.shapes[TIME], scale=0.02), f"{n.native(TIME)}.diff_b": mk.t(mk.shapes[TIME][0], scale=0.02),
         f"{n.native(NORM)}.w_norm": mk.t(32, scale=0.02), f"{n.native(NORM)}.b_norm": mk.t(32, scale=0.02),
         **mk.lora(n.native(FF0), FF0, 4, alpha=a0(4))}
    cases.append(Case("diff-and-norms", t))
    # Keys no loader reads next to a kohya LoRA: an alpha alone, a hypernetwork-ish tensor, a stray name.
    extra = {f"{n.kohya(OUT)}.alpha": a0(4), "lora_unet_foo.hypernet.weight": mk.t(4, 4), "text_projection": mk.t(4, 4)}
    t = {**mk.lora(n.kohya(Q), Q, 4, alpha=a0(4)), **extra}
    cases.append(Case("unknown-keys", t, unused=frozenset(extra)))
    return cases
