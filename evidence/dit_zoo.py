"""A second, tiny zoo from ComfyUI's own Flux and Chroma classes (``python -m evidence.dit_zoo``).

Why a second zoo: the SD1.5-UNet zoo's weights stay close to their random initialisation, so Φ
there mostly sees the shared init (its ``sibling_c`` passes like a descendant). Here the models are
initialised SMALL (:data:`INIT_SCALE` × the tiny-model initialiser, ``prolora_dev.tiny_models``) and
trained until what they learned dominates; the sibling (same init, another data stream) shows it.

Architecture (:data:`DIT_FLUX_CONFIG`): ``comfy.ldm.flux.model.Flux`` with hidden 64, 2 heads, 2
double and 2 single blocks, mlp_ratio 4 (so ComfyUI's diffusers key map slices ``linear1`` as in
Flux.1: q, k, v, then ``proj_mlp`` 4h rows), patch 2, no guidance embedding (a FLUX.1-schnell-like
model), 16 latent channels as ComfyUI's ``latent_formats.Flux`` has. Conditioning: the zoo's fixed
class embeddings (``data.conditioning_table``: 4 tokens × 32) as ``context`` and the first
:data:`VEC_DIM` values of a class's first token as the pooled vector ``y``.

Latents: the 8×8 procedural images of ``evidence.data`` in model space, ``2·rgb − 1`` in channels
0–2 and 0 in channels 3–15 (:func:`flux_latent`); 16 tokens after 2×2 patching.

Objective: ComfyUI's flow matching through ``BaseModel.apply_model`` (``ModelSamplingFlux``, CONST):
``x_t = (1 − σ)·x0 + σ·ε``; apply_model returns ``x_t − σ·v̂``; loss ``‖v̂ − (ε − x0)‖²`` per sample
(:func:`flow_loss`), σ from the model's own σ grid (uniform over its timesteps).

Members (metadata ``prolora.zoo.*`` in each file):

* ``dit_source``   — init seed 0 (small), trained on ``base``.
* ``dit_finetune`` — the source fine-tuned on ``shifted`` (descendant).
* ``dit_chroma``   — ComfyUI's Chroma class: the source's block weights (no per-block modulation
  layers; its ``distilled_guidance_layer`` approximator, seed 2, trained together with the blocks
  on ``base`` for a short while so that it denoises).
* ``dit_sibling``  — init seed 0, trained like the source on another ``base`` data stream (control).
* ``dit_unrelated``— init seed 1, trained like the source (stranger).

LoRAs (rank 4, diffusers/PEFT layout, no alpha → scale 1, ComfyUI's Flux key map):
``transformer.transformer_blocks.{0,1}.attn.to_q|to_k|to_v`` (row slices of ``img_attn.qkv``),
``…attn.to_out.0`` (``img_attn.proj``), ``transformer.single_transformer_blocks.{0,1}.attn.to_q|to_k|to_v``
and ``proj_mlp`` (row slices of ``linear1``), ``…proj_out`` (``linear2``). On the source: style and
concept, 3 training seeds each (``lora_<l>_dit_source_s<seed>``); on every target one trained-on-
target LoRA per kind (``lora_<l>_<target>``, seed 0). The kohya fused layout of a source LoRA
(:func:`kohya_fused`: the SAME ΔW per fused weight, factored by SVD on the whole weight, so the engine
projects it with whole-weight bases) is derived from the diffusers file where it is needed (the
protocol), not shipped: it is a pure function of the file, and the zoo stays under 5 MB.

Budget: single-threaded; see evidence/README.md ("DiT zoo") for the measured build time.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import ZOO_DIR, configure_host

configure_host()

from prolora_core.safetensors_io import atomic_save  # noqa: E402
from prolora_dev import tiny_models  # noqa: E402

from . import data as D  # noqa: E402

DIT_DIR = ZOO_DIR / "dit"
INIT_SCALE = 0.2
VEC_DIM = 16
LATENT_CHANNELS = 16
RANK = 4
BATCH = 32

DIT_FLUX_CONFIG: dict[str, Any] = {
    "image_model": "flux", "in_channels": LATENT_CHANNELS, "out_channels": LATENT_CHANNELS, "vec_in_dim": VEC_DIM,
    "context_in_dim": D.CONTEXT_DIM, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2,
    "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": False,
}
DIT_CHROMA_CONFIG: dict[str, Any] = {
    "image_model": "chroma", "in_channels": LATENT_CHANNELS * 4, "out_channels": LATENT_CHANNELS * 4, "context_in_dim": D.CONTEXT_DIM,
    "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "axes_dim": [8, 12, 12],
    "theta": 10000, "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 64, "hidden_dim": 32, "n_layers": 1,
}

#: Training steps (``--scale`` multiplies them; the shipped zoo: 1.0).
STEPS = {"source": 400, "finetune": 150, "chroma": 150, "lora": 150}
LR = {"source": 3e-3, "finetune": 1e-3, "chroma": 1e-3, "lora": 5e-3}
TARGETS = ("dit_finetune", "dit_chroma", "dit_sibling", "dit_unrelated")
MODELS = ("dit_source",) + TARGETS
LORAS = ("style", "concept")
LORA_SEEDS = (0, 1, 2)
#: data family each model was trained on (the in-domain measure's domain)
DOMAIN = {"dit_source": "base", "dit_finetune": "shifted", "dit_chroma": "base", "dit_sibling": "base", "dit_unrelated": "base"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Models, latents, conditioning, loss
# ------------------------------------------------------------------------------------------------

def build(kind: str, seed: int):
    """A small-init ComfyUI MODEL: ``init_parameters_`` × :data:`INIT_SCALE` (biases and 1-D parameters
    too), norms 1/0 and the RMSNorm scales of QKNorm 1 (as ComfyUI's classes initialise them)."""
    cfg = DIT_FLUX_CONFIG if kind == "Flux" else DIT_CHROMA_CONFIG
    p = tiny_models.build_model(kind, cfg, seed)
    with torch.no_grad():
        for name, prm in p.model.diffusion_model.named_parameters():
            if name.endswith("norm.scale"):
                prm.fill_(1.0)
            elif not any(s in name for s in ("norm.weight", "norm.bias")):
                prm.mul_(INIT_SCALE)
    return p


def flux_latent(img: torch.Tensor) -> torch.Tensor:
    """``[n, 16, 8, 8]`` model-space latent: ``2·rgb − 1`` in channels 0–2, zeros in 3–15."""
    z = torch.zeros(img.shape[0], LATENT_CHANNELS, *img.shape[2:])
    z[:, :3] = img * 2 - 1
    return z


def pooled(ctx: torch.Tensor) -> torch.Tensor:
    """The pooled vector ``y`` ``[n, VEC_DIM]`` of a context ``[n, TOKENS, CONTEXT_DIM]``."""
    return ctx[:, 0, :VEC_DIM]


def batch(kind: str, n: int, seed: int, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    img, cls = D.make_images(kind, n, seed)
    return flux_latent(img), table[cls]


def domain_pair(lora: str, domain: str, n: int, seed: int, table: torch.Tensor):
    """``evidence.data.domain_pair`` in the Flux latent layout: (plain, edited, contexts)."""
    img, cls = D.make_images(domain, n, seed)
    ctx = table[cls] if lora == "style" else table[3].expand(n, *table.shape[1:])
    return flux_latent(img), flux_latent(D.overlay(lora, img)), ctx


def velocity(model, params: dict[str, torch.Tensor] | None, x_t: torch.Tensor, sigma: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """v̂ = (x_t − denoised) / σ through ComfyUI's ``BaseModel.apply_model``; ``params`` (bare
    diffusion-model names) replace parameters for the call. Flux gets ``y`` (pooled), Chroma a
    guidance of 0 (its approximator's input)."""
    extra: dict[str, Any] = {}
    if isinstance(model.diffusion_model, _chroma_cls()):
        extra["guidance"] = torch.zeros(x_t.shape[0])
    else:
        extra["y"] = pooled(ctx)
    if params is None:
        den = model.apply_model(x_t, sigma, c_crossattn=ctx, **extra)
    else:
        from torch.nn.utils.stateless import _reparametrize_module

        with _reparametrize_module(model.diffusion_model, params, strict=False):
            den = model.apply_model(x_t, sigma, c_crossattn=ctx, **extra)
    return (x_t - den) / sigma.view(-1, 1, 1, 1)


def _chroma_cls():
    import comfy.ldm.chroma.model

    return comfy.ldm.chroma.model.Chroma


def sigmas(model, n: int, gen: torch.Generator) -> torch.Tensor:
    ms = model.model_sampling
    return ms.sigmas[torch.randint(0, ms.sigmas.shape[0], (n,), generator=gen)].float()


def flow_loss(model, params, x0, ctx, noise, sigma) -> torch.Tensor:
    """Per-sample flow-matching MSE ``‖v̂ − (ε − x0)‖²`` at ``x_t = (1 − σ)·x0 + σ·ε``.

    ComfyUI's Flux blocks add residuals in place (``img += …``, inference code); under autograd every
    tensor saved for the backward pass is cloned when saved (``saved_tensors_hooks``), so those
    in-place adds cannot invalidate it. Without grad nothing is saved and this costs nothing."""
    s = sigma.view(-1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    with torch.autograd.graph.saved_tensors_hooks(_clone, _same):
        return (velocity(model, params, x_t, sigma, ctx) - (noise - x0)).square().mean(dim=(1, 2, 3))


def _clone(t: torch.Tensor) -> torch.Tensor:
    return t.clone()


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def state(p) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in p.model.diffusion_model.state_dict().items()}


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def train_model(p, family: str, steps: int, lr: float, stream: int, table: torch.Tensor, only: set[str] | None = None) -> list[float]:
    """Adam on every parameter (or those named in ``only``); batch :data:`BATCH`, a fresh batch of
    ``family`` per step from data seeds ``stream + step``, 10 % cond dropout to the empty prompt."""
    dm = p.model.diffusion_model
    params = [v for k, v in dm.named_parameters() if only is None or k in only]
    for v in dm.parameters():
        v.requires_grad_(False)
    for v in params:
        v.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(stream)
    losses = []
    for step in range(steps):
        x0, ctx = batch(family, BATCH, stream + step, table)
        drop = torch.rand(BATCH, generator=gen) < 0.1
        ctx = torch.where(drop.view(-1, 1, 1), table[D.NULL].expand_as(ctx), ctx)
        noise = torch.randn(x0.shape, generator=gen)
        loss = flow_loss(p.model, None, x0, ctx, noise, sigmas(p.model, BATCH, gen)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        for g in opt.param_groups:  # cosine decay
            g["lr"] = lr * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * (step + 1) / steps)).item())
        losses.append(float(loss.detach()))
    for v in dm.parameters():
        v.requires_grad_(False)
    return losses


def lora_places(p) -> dict[str, tuple[str, tuple[int, int, int] | None]]:
    """Diffusers LoRA module → (bare weight key, row slice or None), from ComfyUI's own key map
    (``comfy.lora.model_lora_keys_unet``), for the modules the zoo's LoRAs adapt."""
    import comfy.lora

    out = {}
    for name, tgt in comfy.lora.model_lora_keys_unet(p.model, {}).items():
        if not name.startswith("transformer.") or not _is_lora_target(name):
            continue
        key, off = (tgt, None) if isinstance(tgt, str) else (tgt[0], tgt[1])
        out[name] = (key[len("diffusion_model."):], None if off is None else tuple(int(v) for v in off))
    return dict(sorted(out.items()))


def _is_lora_target(name: str) -> bool:
    n = name.removeprefix("transformer.")
    if n.startswith("transformer_blocks."):
        return n.split(".", 2)[2] in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
    if n.startswith("single_transformer_blocks."):
        return n.split(".", 2)[2] in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")
    return False


def dense_deltas(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], places, st: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole-weight ΔW per bare weight key (each module's ``B @ A`` written into its rows)."""
    out: dict[str, torch.Tensor] = {}
    for name, (a, b) in factors.items():
        key, off = places[name]
        d = out.get(key)
        if d is None:
            d = out[key] = torch.zeros_like(st[key])
        upd = b @ a
        if off is None:
            out[key] = d + upd
        else:
            out[key] = torch.cat([d[:off[1]], d[off[1]:off[1] + off[2]] + upd, d[off[1] + off[2]:]])
    return out


def train_lora(p, lora: str, seed: int, table: torch.Tensor, steps: int) -> dict[str, torch.Tensor]:
    """A rank-:data:`RANK` diffusers/PEFT LoRA on ``lora``'s data (``lora_A`` ~ N(0, 1/n), ``lora_B`` = 0);
    returns the file's tensors (float16)."""
    places = lora_places(p)
    st = state(p)
    gen = torch.Generator().manual_seed(10_000 + seed)
    factors = {}
    for name, (key, off) in places.items():
        m = st[key].shape[0] if off is None else off[2]
        n = st[key].shape[1]
        factors[name] = ((torch.randn(RANK, n, generator=gen) / n ** 0.5).requires_grad_(), torch.zeros(m, RANK, requires_grad=True))
    opt = torch.optim.Adam([t for ab in factors.values() for t in ab], lr=LR["lora"])
    stream = 5_000_000 + 100_000 * seed + (0 if lora == "style" else 50_000)
    for step in range(steps):
        x0, ctx = batch(lora, BATCH, stream + step, table)
        noise = torch.randn(x0.shape, generator=gen)
        deltas = dense_deltas(factors, places, st)
        params = {k: st[k] + d for k, d in deltas.items()}
        loss = flow_loss(p.model, params, x0, ctx, noise, sigmas(p.model, BATCH, gen)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = {}
    for name, (a, b) in factors.items():
        out[f"{name}.lora_A.weight"] = a.detach().to(torch.float16)
        out[f"{name}.lora_B.weight"] = b.detach().to(torch.float16)
    return out


def kohya_fused(diffusers: dict[str, torch.Tensor], places, rows: dict[str, int]) -> dict[str, torch.Tensor]:
    """The same ΔW per weight in kohya fused layout (``lora_unet_<weight>`` on the WHOLE weight):
    the dense ΔW of all modules on that weight factored by SVD at its rank (exact up to fp16), so
    the up factor is dense and the engine uses whole-weight bases (no ``split_qkv`` blocks)."""
    per_key: dict[str, list] = {}
    for name, (key, off) in places.items():
        a = diffusers[f"{name}.lora_A.weight"].double()
        b = diffusers[f"{name}.lora_B.weight"].double()
        per_key.setdefault(key, []).append((off, b @ a))
    out = {}
    for key, parts in per_key.items():
        n = parts[0][1].shape[1]
        m = rows[key]
        d = torch.zeros(m, n, dtype=torch.float64)
        for off, upd in parts:
            if off is None:
                d += upd
            else:
                d[off[1]:off[1] + off[2]] += upd
        r = min(RANK * len(parts), min(d.shape))
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        up, down = u[:, :r] * s[:r].sqrt(), s[:r].sqrt()[:, None] * vh[:r]
        base = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
        out[f"{base}.lora_up.weight"] = up.to(torch.float16).contiguous()
        out[f"{base}.lora_down.weight"] = down.to(torch.float16).contiguous()
        out[f"{base}.alpha"] = torch.tensor(float(r), dtype=torch.float16)
    return out


# ------------------------------------------------------------------------------------------------
# Jobs
# ------------------------------------------------------------------------------------------------

def meta(name: str, **extra: Any) -> dict[str, str]:
    return {"prolora.zoo.name": name, "prolora.zoo.data": DOMAIN.get(name, "base"),
            **{f"prolora.zoo.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()}}


def save_model(p, out: Path, name: str, **extra: Any) -> None:
    tiny_models.save_tiny_model(p, out / f"{name}.safetensors", dtype=torch.float16, extra_meta=meta(name, **extra))


def load(out: Path, name: str):
    return tiny_models.load_tiny_model(out / f"{name}.safetensors")


def build_models(out: Path, table: torch.Tensor, scale: float, only: set[str]) -> dict[str, float]:
    times = {}
    steps = {k: max(1, int(v * scale)) for k, v in STEPS.items()}

    def done(name: str, t0: float, losses: list[float]) -> None:
        times[name] = time.time() - t0
        log(f"{name}: {len(losses)} steps in {times[name]:.0f} s (process CPU so far {time.process_time():.0f} s), loss first 20 {sum(losses[:20]) / 20:.4f} → last 50 "
            f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")

    for name, seed, stream in (("dit_source", 0, 1_000_000), ("dit_sibling", 0, 2_000_000), ("dit_unrelated", 1, 3_000_000)):
        if name not in only:
            continue
        t0 = time.time()
        p = build("Flux", seed)
        losses = train_model(p, "base", steps["source"], LR["source"], stream, table)
        save_model(p, out, name, init_seed=seed, init_scale=INIT_SCALE, data_stream=stream, steps=steps["source"], lr=LR["source"],
                   final_loss=sum(losses[-50:]) / len(losses[-50:]))
        done(name, t0, losses)
    if "dit_finetune" in only:
        t0 = time.time()
        p = load(out, "dit_source")
        losses = train_model(p, "shifted", steps["finetune"], LR["finetune"], 4_000_000, table)
        save_model(p, out, "dit_finetune", parent="dit_source", data_stream=4_000_000, steps=steps["finetune"], lr=LR["finetune"],
                   final_loss=sum(losses[-50:]) / len(losses[-50:]))
        done("dit_finetune", t0, losses)
    if "dit_chroma" in only:
        t0 = time.time()
        src = load(out, "dit_source")
        p = build("Chroma", 2)
        sd, own = state(src), p.model.diffusion_model.state_dict()
        shared = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
        p.model.diffusion_model.load_state_dict({**own, **shared})
        losses = train_model(p, "base", steps["chroma"], LR["chroma"], 6_000_000, table)
        save_model(p, out, "dit_chroma", parent="dit_source", copied_from_source=len(shared), data_stream=6_000_000,
                   steps=steps["chroma"], lr=LR["chroma"], final_loss=sum(losses[-50:]) / len(losses[-50:]))
        done("dit_chroma", t0, losses)
    return times


def build_loras(out: Path, table: torch.Tensor, scale: float, only: set[str]) -> dict[str, float]:
    times = {}
    steps = max(1, int(STEPS["lora"] * scale))
    jobs = [(l, "dit_source", s) for l in LORAS for s in LORA_SEEDS] + [(l, t, 0) for t in TARGETS for l in LORAS]
    for lora, model, seed in jobs:
        name = f"lora_{lora}_{model}" + (f"_s{seed}" if model == "dit_source" else "")
        if name not in only:
            continue
        t0 = time.time()
        p = load(out, model)
        tensors = train_lora(p, lora, seed, table, steps)
        md = {"prolora.zoo.name": name, "prolora.zoo.base": model, "prolora.zoo.lora": lora, "prolora.zoo.seed": str(seed),
              "prolora.zoo.steps": str(steps), "prolora.zoo.layout": "diffusers"}
        atomic_save(tensors, out / f"{name}.safetensors", metadata=md)
        times[name] = time.time() - t0
        log(f"{name}: {steps} steps in {times[name]:.0f} s (process CPU so far {time.process_time():.0f} s)")
    return times


def all_jobs() -> list[str]:
    return list(MODELS) + [f"lora_{l}_dit_source_s{s}" for l in LORAS for s in LORA_SEEDS] + [f"lora_{l}_{t}" for t in TARGETS for l in LORAS]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evidence.dit_zoo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DIT_DIR)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every step count (prototyping)")
    ap.add_argument("--only", nargs="*", help=f"jobs (default all): {' '.join(all_jobs())}")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    table = D.conditioning_table()
    atomic_save({"context": table}, args.out / "conditioning.safetensors", metadata={"prolora.zoo.name": "conditioning"})
    only = set(args.only or all_jobs())
    t0 = time.time()
    times = build_models(args.out, table, args.scale, only)
    times.update(build_loras(args.out, table, args.scale, only))
    log(f"built {len(times)} jobs in {time.time() - t0:.0f} s")
    prev = {}
    tf = args.out / "build_times.json"
    if tf.is_file():
        prev = json.loads(tf.read_text())
    tf.write_text(json.dumps({**prev, **{k: round(v, 1) for k, v in times.items()}, "scale": args.scale}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
