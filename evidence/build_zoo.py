"""Build the zoo: tiny SD1.5-shaped UNets and LoRAs, trained with ComfyUI's own model.

    cd <repo> && nice -n 5 .venv/bin/python -m evidence.build_zoo            # everything (~30–35 min, 2 cores)
    .venv/bin/python -m evidence.build_zoo --only lora_style_source --out /tmp/z   # rebuild one artifact elsewhere
    .venv/bin/python -m evidence.build_zoo --check-samples                    # KSampler samples of the shipped zoo

Models (``zoo/<name>.safetensors``, fp16, ``model.diffusion_model.`` keys, metadata as in
``tests/comfy_host.save_model_state``):

* ``source``        — trained from init seed 0 on the ``base`` data.
* ``descendant_a``  — ``source`` fine-tuned 600 steps on the ``shifted`` data (dark backgrounds, other palette).
* ``descendant_a_near`` — a gentle relative: ``source`` fine-tuned 300 steps at lr 5e-4 on the ``mixed``
                      data (70 % ``base``, 30 % ``shifted``), so most of its domain is still the source's.
* ``ladder_mid`` / ``ladder_far`` — rungs of the ladder beyond ``descendant_a``: its recipe (600 steps on
                      the same ``shifted`` data stream) at lr 3e-3 / 8e-3 instead of 1e-3.
* ``sibling_c``     — the source's init (seed 0) trained like C (C's data stream): no shared
                      training with the source, only the shared initialisation — the control for
                      how much of Φ the init alone explains.
* ``unrelated_c``   — same architecture, init seed 1, its own ``base`` data draw: no shared history.
* ``descendant_b``  — a pruned copy of ``source`` (like SSD-1B from SDXL): the mid-block's
                      transformer and second res block are removed (``transformer_depth_middle`` −1,
                      as SSD-1B's config), and the level-1 output stage keeps its two transformer
                      blocks, in order, in ONE SpatialTransformer (``transformer_depth_output``
                      [1, 1, 2, 0]; ``output_blocks.0.1``'s proj_in / proj_out / norm are gone):
                      B's ``output_blocks.1.1.transformer_blocks.0`` is the source's
                      ``output_blocks.0.1.transformer_blocks.0`` and the source's
                      ``output_blocks.1.1.transformer_blocks.0`` is renumbered to ``…transformer_blocks.1``,
                      so a name now points at another block's weights. Initialised from the source's
                      weights (:data:`B_FROM_SOURCE`), then distilled from the source on the ``base``
                      data (ε-prediction of the source as teacher + the plain diffusion loss).
* ``turbo``         — a few-step student of ``source`` (like SDXL-Turbo / Z-Image Turbo from their
                      bases): initialised from the source's weights and trained so that ONE euler
                      step of its own schedule (KSampler ``euler``, ``sgm_uniform``, 4 steps, cfg 1:
                      :data:`TURBO_SAMPLING`) lands where the source's guided trajectory (euler,
                      cfg 2, 16 ``sgm_uniform`` steps, whose grid contains the student's) lands
                      after four of its steps: piecewise trajectory distillation with the guidance
                      distilled in (see :func:`train_turbo`). No LoRA is trained on it.

LoRAs (``zoo/lora_<style|concept>_<model>.safetensors``, rank 4, alpha 4, fp16, kohya names): the
same data, steps, init seed and data seed on every model; style 900 steps at lr 6e-3 (its first
300-step version barely showed in samples even on the source), concept 300 steps at lr 4e-3.

Training is in ComfyUI's k-diffusion parametrisation on the model's own ``model_sampling``
(ε-prediction, ``x_t = x0 + σ·ε`` with σ of a uniformly drawn discrete timestep), through
``BaseModel.apply_model``. Every base model is rounded to fp16 right after training, so that what
is trained on it later (descendants, LoRAs) sees exactly the shipped weights.

Determinism: every job runs single-threaded with fixed seeds; on the same machine and torch build
a rebuild gives bit-identical tensors (a from-scratch rebuild reproduced every shipped tensor, see
evidence/README.md).
Across torch builds / CPUs the float summation order may differ, and training amplifies that: expect
the same evidence (tables within their seed spread), not the same bytes.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
import multiprocessing as mp

import torch

from . import EVIDENCE_DIR, ZOO_DIR, configure_host

configure_host()

from . import data as D  # noqa: E402
from .lora_utils import init_lora, lora_deltas, merged_params, to_kohya  # noqa: E402
from .models import (SD15_UNET_CONFIG, build_model, diffusion_loss, eps_prediction, load_zoo_model,  # noqa: E402
                     sample_training_sigmas, save_zoo_model, unet_state)

BATCH = 32
COND_DROPOUT = 0.1
LORA_RANK = 4
LORA_ALPHA = 4.0
LORA_INIT_SEED = 77
LORA_DATA_SEED = 5000


@dataclass(frozen=True)
class Recipe:
    source_steps: int = 1500
    source_lr: float = 2e-3
    a_steps: int = 600
    a_near_steps: int = 150  # v1 only (descendant_a_near was this checkpoint of descendant_a); unused since v2
    a_lr: float = 1e-3
    lora_steps: int = 300
    lora_lr: float = 4e-3
    # v2: the style LoRA trains longer (its 300-step version barely showed in samples even on the
    # source) and descendant_a_near is a gentle fine-tune of source on the 70/30 base/shifted mix
    # (no longer descendant_a's early checkpoint), so its trained-on-target LoRA is not dominated by
    # undoing domain drift.
    style_lora_steps: int = 900
    style_lora_lr: float = 6e-3
    near_steps: int = 300
    near_lr: float = 5e-4
    # v3: descendant B (pruned + distilled)
    b_steps: int = 1000
    b_lr: float = 1e-3
    # v4: two more rungs of the ladder, descendant A's recipe (600 steps on the shifted data, same
    # data stream) at a larger learning rate, so the distance to the source grows step by step
    ladder_mid_lr: float = 3e-3
    ladder_far_lr: float = 8e-3
    # v6: the turbo (few-step student of the source, trajectory-distilled; see train_turbo)
    turbo_steps: int = 800
    turbo_lr: float = 5e-4
    turbo_pool: int = 512  # teacher trajectories (noise draws) the student is trained on

    def scaled(self, f: float) -> "Recipe":
        """Every ``*_steps`` times ``f`` (at least 2; the unused v1 ``a_near_steps`` at least 1); rates unchanged."""
        return replace(self, **{k: max(1 if k == "a_near_steps" else 2, int(v * f)) for k, v in asdict(self).items() if k.endswith("_steps")})


MODELS = ("source", "descendant_a_near", "descendant_a", "ladder_mid", "ladder_far", "descendant_b", "unrelated_c", "sibling_c", "turbo")

#: The turbo's own sampling with ComfyUI's KSampler: sampler, scheduler, steps, cfg (guidance is
#: distilled in, so cfg 1: one model call per step, the negative prompt is not used).
TURBO_SAMPLING = {"sampler": "euler", "scheduler": "sgm_uniform", "steps": 4, "cfg": 1.0}
#: The teacher path the turbo is distilled from: the source with euler at this cfg on the
#: ``sgm_uniform`` grid of ``steps × TURBO_TEACHER_REFINE`` steps. ``sgm_uniform`` grids nest
#: (timesteps linspace(999, 0, n + 1)[:-1], then σ = 0), so every 4th teacher σ is a student σ.
TURBO_TEACHER_CFG = 2.0
TURBO_TEACHER_REFINE = 4

#: Descendant B's architecture: the source's with SSD-1B-style pruning (see the module docstring).
#: ``transformer_depth_output`` is popped from its END by ComfyUI's UNetModel: output_blocks.0 gets 2.
B_UNET_CONFIG = {**SD15_UNET_CONFIG, "transformer_depth_middle": -1, "transformer_depth_output": [1, 1, 2, 0]}
#: B's weights that come from a differently named source weight (prefix → prefix); every other B
#: weight comes from the source weight of the same name. The level-1 output stage's two blocks, in
#: their order, now live in output_blocks.1.1's SpatialTransformer: block 0 came from
#: output_blocks.0.1, and the source's output_blocks.1.1 block 0 is renumbered to block 1.
B_FROM_SOURCE = {"output_blocks.1.1.transformer_blocks.0.": "output_blocks.0.1.transformer_blocks.0.",
                 "output_blocks.1.1.transformer_blocks.1.": "output_blocks.1.1.transformer_blocks.0."}
LORAS = ("style", "concept")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _lr(step: int, steps: int, lr: float, warmup: int = 50) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def _cond(ctx: torch.Tensor, gen: torch.Generator, table: torch.Tensor) -> torch.Tensor:
    drop = torch.rand(ctx.shape[0], generator=gen) < COND_DROPOUT
    return torch.where(drop.view(-1, 1, 1), table[D.NULL].expand_as(ctx), ctx)


def round_fp16_(patcher) -> None:
    with torch.no_grad():
        for p in patcher.model.diffusion_model.parameters():
            p.copy_(p.half().float())


def train_full(patcher, family: str, steps: int, lr: float, data_seed: int, name: str,
               checkpoints: dict[int, Path] | None = None, meta: dict[str, str] | None = None,
               teacher=None) -> list[float]:
    """Train all UNet weights on ``family`` data (Adam, warm-up + cosine); returns the loss curve.

    With a ``teacher`` MODEL this is distillation: the loss adds the MSE to the teacher's
    ε-prediction (the curve then holds that MSE)."""
    model = patcher.model
    dm = model.diffusion_model
    dm.train()
    if teacher is not None:
        teacher.model.diffusion_model.eval()
    opt = torch.optim.Adam(dm.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(data_seed + 1)
    table = D.conditioning_table()
    losses = []
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr)
        x0, ctx, _ = D.make_batch(family, BATCH, data_seed * 100_000 + step, table)
        sigma = sample_training_sigmas(model, BATCH, gen)
        noise = torch.randn(x0.shape, generator=gen)
        if teacher is None:
            loss = shown = diffusion_loss(model, None, x0, _cond(ctx, gen, table), noise, sigma).mean()
        else:
            loss, shown = _distillation_loss(model, teacher.model, x0, _cond(ctx, gen, table), noise, sigma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dm.parameters(), 1.0)
        opt.step()
        losses.append(float(shown.detach()))
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"{name}: step {step + 1}/{steps} {'loss' if teacher is None else 'distillation MSE'}(avg100) "
                f"{sum(losses[-100:]) / len(losses[-100:]):.4f} "
                f"({(time.time() - t0) / (step + 1):.2f} s/step)")
        if checkpoints and (step + 1) in checkpoints:
            snap = {k: v.clone() for k, v in dm.state_dict().items()}
            round_fp16_(patcher)
            save_zoo_model(patcher, checkpoints[step + 1], {**(meta or {}), "prolora.zoo.steps": str(step + 1)})
            dm.load_state_dict(snap)
    dm.eval()
    round_fp16_(patcher)
    return losses


def pruned_init(source_state: dict[str, torch.Tensor], patcher) -> dict[str, str]:
    """Load descendant B's weights from the source's (:data:`B_FROM_SOURCE`); returns B key → source key."""
    dm = patcher.model.diffusion_model
    origin = {}
    for key in dm.state_dict():
        src = key
        for b_prefix, s_prefix in B_FROM_SOURCE.items():
            if key.startswith(b_prefix):
                src = s_prefix + key[len(b_prefix):]
        if src not in source_state or source_state[src].shape != dm.state_dict()[key].shape:
            raise ValueError(f"descendant B weight {key} has no source counterpart {src}")
        origin[key] = src
    dm.load_state_dict({k: source_state[s] for k, s in origin.items()})
    return origin


def _distillation_loss(model, teacher, x0, cond, noise, sigma) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher ε-prediction MSE + diffusion loss, the MSE alone) at x_t = x0 + σ·ε."""
    x_t = x0 + sigma.view(-1, 1, 1, 1) * noise
    with torch.no_grad():
        teacher_eps = eps_prediction(teacher, None, x_t, sigma, cond)
    eps = eps_prediction(model, None, x_t, sigma, cond)
    kd = (eps - teacher_eps).square().mean()
    task = (eps - noise).square().mean()
    return kd + task, kd


def turbo_sigmas(model, refine: int = 1) -> torch.Tensor:
    """The turbo's σ grid (``TURBO_SAMPLING``'s scheduler and steps, ComfyUI's ``calculate_sigmas``),
    or the teacher's ``refine``-times finer grid on the same scheduler; σ_0 = σ_max … 0, float32."""
    import comfy.samplers

    return comfy.samplers.calculate_sigmas(model.model_sampling, TURBO_SAMPLING["scheduler"],
                                           TURBO_SAMPLING["steps"] * refine).float()


@torch.no_grad()
def teacher_trajectories(teacher, n: int, seed: int, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's guided euler paths from ``n`` noise draws, kept at the student's σ grid.

    What ComfyUI's KSampler does at full denoise (``EPS.noise_scaling`` with ``max_denoise``:
    x = ε·√(1 + σ_max²); euler x ← x + (σ' − σ)·ε̂; CFG ε̂ = ε̂_∅ + cfg·(ε̂_c − ε̂_∅)), on the
    ``TURBO_TEACHER_REFINE``-times finer ``sgm_uniform`` grid. Returns (σ: steps + 1, classes: n,
    points: n × (steps + 1) × 4 × SIZE × SIZE, the last being the teacher's sample)."""
    fine = turbo_sigmas(teacher.model, TURBO_TEACHER_REFINE)
    gen = torch.Generator().manual_seed(seed)
    classes = torch.randint(0, D.NULL, (n,), generator=gen)
    x = torch.randn((n, 4, D.SIZE, D.SIZE), generator=gen) * math.sqrt(1.0 + float(fine[0]) ** 2)
    points = [x]
    for i in range(len(fine) - 1):
        eps = []
        for j in range(0, n, 256):
            xj, cj = x[j:j + 256], classes[j:j + 256]
            s = fine[i].expand(xj.shape[0])
            e_c = eps_prediction(teacher.model, None, xj, s, table[cj])
            e_u = eps_prediction(teacher.model, None, xj, s, table[D.NULL].expand(xj.shape[0], -1, -1))
            eps.append(e_u + TURBO_TEACHER_CFG * (e_c - e_u))
        x = x + (fine[i + 1] - fine[i]) * torch.cat(eps)
        if (i + 1) % TURBO_TEACHER_REFINE == 0:
            points.append(x)
    return fine[::TURBO_TEACHER_REFINE], classes, torch.stack(points, 1)


def train_turbo(student, teacher, steps: int, lr: float, pool: int, seed: int, name: str) -> list[float]:
    """Piecewise trajectory distillation (in the spirit of progressive distillation, Salimans & Ho
    2022, with all halvings at once): the student (initialised from the teacher) learns to take ONE
    euler step per σ interval of its own grid, landing on the teacher's guided path.

    Pool: :func:`teacher_trajectories` of ``pool`` noise draws. Step: a batch of (draw, interval i)
    pairs; target ε* = (x_{i+1} − x_i) / (σ_{i+1} − σ_i) (what a euler step from x_i at σ_i must
    predict to reach x_{i+1}); loss: the error this makes in x_{i+1}, relative to that point's scale,
    ‖(σ_{i+1} − σ_i)·(ε̂_student(x_i, σ_i, prompt) − ε*)‖² / (σ_{i+1}² + σ_data²) (σ_data: std of the
    teacher's samples; so the last step, which writes the image, is not drowned by the first);
    conditional only (cfg 1). Adam, warm-up + cosine, gradient clip 1. Returns the loss curve."""
    model = student.model
    dm = model.diffusion_model
    table = D.conditioning_table()
    t0 = time.time()
    sig, classes, pts = teacher_trajectories(teacher, pool, seed, table)
    log(f"{name}: {pool} teacher trajectories in {time.time() - t0:.0f} s; student σ grid {[round(float(s), 3) for s in sig]}")
    k = len(sig) - 1
    sigma_data = float(pts[:, -1].std())
    dm.train()
    opt = torch.optim.Adam(dm.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    losses = []
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr)
        j = torch.randint(0, pool, (BATCH,), generator=gen)
        i = torch.randint(0, k, (BATCH,), generator=gen)
        x_i, x_next = pts[j, i], pts[j, i + 1]
        s_i, s_next = sig[i], sig[i + 1]
        step_size = (s_next - s_i).view(-1, 1, 1, 1)
        target = (x_next - x_i) / step_size
        eps = eps_prediction(model, None, x_i, s_i, table[classes[j]])
        loss = ((step_size * (eps - target)).square() / (s_next.view(-1, 1, 1, 1).square() + sigma_data ** 2)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dm.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"{name}: step {step + 1}/{steps} x-step error(avg100) {sum(losses[-100:]) / len(losses[-100:]):.4f} "
                f"({(time.time() - t0) / (step + 1):.2f} s/step)")
    dm.eval()
    round_fp16_(student)
    return losses


def train_lora(patcher, family: str, steps: int, lr: float, name: str, seed: int = 0) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Train a rank-4 LoRA (frozen base) on ``family`` data; returns kohya tensors and the loss curve.

    ``seed`` > 0 shifts the LoRA's init seed and its data/σ/noise/dropout stream (a repeat training
    for the spread over training seeds); 0 is the shipped zoo's LoRAs."""
    model = patcher.model
    model.diffusion_model.eval()
    for p in model.diffusion_model.parameters():
        p.requires_grad_(False)
    state = unet_state(patcher)
    factors = init_lora(state, LORA_RANK, LORA_INIT_SEED + 1000 * seed)
    data_seed = LORA_DATA_SEED + 1000 * seed
    params = [t for pair in factors.values() for t in pair]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(data_seed + 1)
    table = D.conditioning_table()
    scale = LORA_ALPHA / LORA_RANK
    losses = []
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, warmup=20)
        x0, ctx, _ = D.make_batch(family, BATCH, data_seed * 100_000 + step, table)
        sigma = sample_training_sigmas(model, BATCH, gen)
        noise = torch.randn(x0.shape, generator=gen)
        merged = merged_params(state, lora_deltas(factors, scale))
        loss = diffusion_loss(model, merged, x0, _cond(ctx, gen, table), noise, sigma).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"{name}: step {step + 1}/{steps} loss(avg100) {sum(losses[-100:]) / len(losses[-100:]):.4f} "
                f"({(time.time() - t0) / (step + 1):.2f} s/step)")
    return to_kohya(factors, state, LORA_ALPHA), losses


# ------------------------------------------------------------------------------------------------
# Jobs (each runs in its own single-threaded process)
# ------------------------------------------------------------------------------------------------

def _meta(name: str, recipe: Recipe, **extra: str) -> dict[str, str]:
    return {"prolora.zoo.name": name, "prolora.zoo.recipe": json.dumps(recipe.__dict__), **extra}


def job(name: str, out: str, recipe_json: str) -> tuple[str, float]:
    torch.set_num_threads(1)
    out_dir, recipe = Path(out), Recipe(**json.loads(recipe_json))
    t0 = time.time()
    if name == "source":
        p = build_model(SD15_UNET_CONFIG, seed=0)
        train_full(p, "base", recipe.source_steps, recipe.source_lr, data_seed=1, name=name)
        save_zoo_model(p, out_dir / "source.safetensors", _meta(name, recipe, **{"prolora.zoo.data": "base", "prolora.zoo.init_seed": "0"}))
    elif name == "sibling_c":  # the source's init, C's data stream: what a shared init alone gives Φ
        p = build_model(SD15_UNET_CONFIG, seed=0)
        train_full(p, "base", recipe.source_steps, recipe.source_lr, data_seed=2, name=name)
        save_zoo_model(p, out_dir / "sibling_c.safetensors", _meta(name, recipe, **{"prolora.zoo.data": "base", "prolora.zoo.init_seed": "0"}))
    elif name == "unrelated_c":
        p = build_model(SD15_UNET_CONFIG, seed=1)
        train_full(p, "base", recipe.source_steps, recipe.source_lr, data_seed=2, name=name)
        save_zoo_model(p, out_dir / "unrelated_c.safetensors", _meta(name, recipe, **{"prolora.zoo.data": "base", "prolora.zoo.init_seed": "1"}))
    elif name == "descendant_a":
        p = load_zoo_model(out_dir / "source.safetensors")
        train_full(p, "shifted", recipe.a_steps, recipe.a_lr, data_seed=3, name=name)
        save_zoo_model(p, out_dir / "descendant_a.safetensors", _meta(name, recipe, **{"prolora.zoo.data": "shifted", "prolora.zoo.parent": "source"}))
    elif name in ("ladder_mid", "ladder_far"):
        p = load_zoo_model(out_dir / "source.safetensors")
        lr = recipe.ladder_mid_lr if name == "ladder_mid" else recipe.ladder_far_lr
        train_full(p, "shifted", recipe.a_steps, lr, data_seed=3, name=name)  # descendant_a's data stream
        save_zoo_model(p, out_dir / f"{name}.safetensors", _meta(name, recipe, **{"prolora.zoo.data": "shifted", "prolora.zoo.parent": "source"}))
    elif name == "descendant_a_near":
        p = load_zoo_model(out_dir / "source.safetensors")
        train_full(p, "mixed", recipe.near_steps, recipe.near_lr, data_seed=4, name=name)
        save_zoo_model(p, out_dir / "descendant_a_near.safetensors", _meta(name, recipe, **{"prolora.zoo.data": "mixed", "prolora.zoo.parent": "source"}))
    elif name == "descendant_b":
        teacher = load_zoo_model(out_dir / "source.safetensors")
        p = build_model(B_UNET_CONFIG, seed=0)
        origin = pruned_init(unet_state(teacher), p)
        renamed = sorted({k.rsplit(".", 1)[0] for k, s in origin.items() if k != s})
        log(f"{name}: {sum(v.numel() for v in p.model.diffusion_model.parameters())} parameters, "
            f"{len(renamed)} renamed modules from the source")
        train_full(p, "base", recipe.b_steps, recipe.b_lr, data_seed=6, name=name, teacher=teacher)
        save_zoo_model(p, out_dir / "descendant_b.safetensors", _meta(name, recipe, **{
            "prolora.zoo.data": "base", "prolora.zoo.parent": "source",
            "prolora.zoo.renamed_from": json.dumps(B_FROM_SOURCE)}))
    elif name == "turbo":
        teacher = load_zoo_model(out_dir / "source.safetensors")
        p = load_zoo_model(out_dir / "source.safetensors")
        losses = train_turbo(p, teacher, recipe.turbo_steps, recipe.turbo_lr, recipe.turbo_pool, seed=7, name=name)
        save_zoo_model(p, out_dir / "turbo.safetensors", _meta(name, recipe, **{
            "prolora.zoo.data": "base", "prolora.zoo.parent": "source",
            "prolora.zoo.sampling": json.dumps(TURBO_SAMPLING),
            "prolora.zoo.teacher": json.dumps({"model": "source", "sampler": "euler", "scheduler": TURBO_SAMPLING["scheduler"],
                                               "steps": TURBO_SAMPLING["steps"] * TURBO_TEACHER_REFINE, "cfg": TURBO_TEACHER_CFG}),
            "prolora.zoo.final_loss": f"{sum(losses[-50:]) / len(losses[-50:]):.5f}"}))
    elif name.startswith("lora_"):
        _, family, model_name = name.split("_", 2)
        p = load_zoo_model(out_dir / f"{model_name}.safetensors")
        steps, lr = (recipe.style_lora_steps, recipe.style_lora_lr) if family == "style" else (recipe.lora_steps, recipe.lora_lr)
        tensors, losses = train_lora(p, family, steps, lr, name)
        import safetensors.torch
        safetensors.torch.save_file(tensors, str(out_dir / f"{name}.safetensors"), metadata={
            "ss_network_dim": str(LORA_RANK), "ss_network_alpha": str(LORA_ALPHA), "prolora.zoo.base": model_name,
            "prolora.zoo.data": family, "prolora.zoo.final_loss": f"{sum(losses[-50:]) / len(losses[-50:]):.5f}",
            **_meta(name, recipe)})
    else:
        raise ValueError(f"unknown job {name}")
    return name, time.time() - t0


def save_conditioning(out_dir: Path) -> Path:
    import safetensors
    import safetensors.torch

    path = out_dir / "conditioning.safetensors"
    table = D.conditioning_table().contiguous()
    meta = {"classes": json.dumps(list(D.CLASSES) + ["<empty prompt>"]), "tokens": str(D.TOKENS), "seed": str(D.COND_SEED)}
    if path.is_file():  # same content already there: keep the file (safetensors orders metadata keys at random)
        with safetensors.safe_open(str(path), "pt") as f:
            if f.metadata() == meta and list(f.keys()) == ["context"] and torch.equal(f.get_tensor("context"), table):
                return path
    safetensors.torch.save_file({"context": table}, str(path), metadata=meta)
    return path


def load_conditioning(zoo: Path = ZOO_DIR) -> torch.Tensor:
    import safetensors.torch

    return safetensors.torch.load_file(str(zoo / "conditioning.safetensors"))["context"]


# ------------------------------------------------------------------------------------------------
# ComfyUI sampling (the stock KSampler path)
# ------------------------------------------------------------------------------------------------

def ksample(patcher, cls: int, n: int, seed: int, *, steps: int = 15, cfg: float = 2.0, table: torch.Tensor | None = None,
            sampler: str = "euler", scheduler: str = "normal") -> torch.Tensor:
    """``n`` samples of class ``cls`` through ``nodes.common_ksampler`` (default euler, normal; the
    turbo: ``**TURBO_SAMPLING``); returns RGB images."""
    import comfy.model_management
    import comfy.utils
    import nodes

    comfy.utils.PROGRESS_BAR_ENABLED = False  # no tqdm bars on stderr
    table = D.conditioning_table() if table is None else table
    pos = [[table[cls][None].clone(), {}]]
    neg = [[table[D.NULL][None].clone(), {}]]
    latent = {"samples": torch.zeros((n, 4, D.SIZE, D.SIZE))}
    (out,) = nodes.common_ksampler(patcher, seed, steps, cfg, sampler, scheduler, pos, neg, latent)
    # ComfyUI keeps the model loaded with the LoRA patched INTO the shared weights (clones share one
    # model); unload so that later direct uses of patcher.model (losses) see the clean weights again.
    comfy.model_management.unload_all_models()
    return D.latent_to_image(out["samples"])


def with_lora(patcher, lora: dict[str, torch.Tensor], strength: float = 1.0):
    """A clone of ``patcher`` with ``lora`` applied by ComfyUI's own LoRA loader."""
    import comfy.sd

    new, _ = comfy.sd.load_lora_for_models(patcher, None, lora, strength, 0.0)
    return new


def save_grid(rows: list[tuple[str, torch.Tensor]], path: Path, title: str = "") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncol = max(r[1].shape[0] for r in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(ncol * 0.7 + 1.6, len(rows) * 0.75 + 0.4), squeeze=False)
    for i, (label, imgs) in enumerate(rows):
        for j in range(ncol):
            ax = axes[i][j]
            ax.set_xticks([]), ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if j < imgs.shape[0]:
                ax.imshow(imgs[j].permute(1, 2, 0).numpy(), interpolation="nearest")
        axes[i][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def check_samples(zoo: Path, out_png: Path, n: int = 8) -> dict[str, dict[str, float]]:
    """KSampler samples (15 euler steps, cfg 2) of every zoo model and LoRA; a grid PNG and detector stats."""
    import safetensors.torch

    torch.set_num_threads(1)
    table = load_conditioning(zoo)
    rows, stats = [], {}
    for m in MODELS:
        if not (zoo / f"{m}.safetensors").exists():
            continue
        p = load_zoo_model(zoo / f"{m}.safetensors")
        variants = [(m, p)] + [(f"{m}+{l}", with_lora(p, safetensors.torch.load_file(str(zoo / f"lora_{l}_{m}.safetensors"))))
                               for l in LORAS if (zoo / f"lora_{l}_{m}.safetensors").exists()]
        for label, q in variants:
            how = TURBO_SAMPLING if m == "turbo" else {}  # the turbo in its own few-step sampling
            imgs = torch.cat([ksample(q, c, n // 2 if c < 3 else n, seed=c, table=table, **how) for c in range(4)])
            rows.append((label, imgs))
            plain, ring = imgs[: 3 * (n // 2)], imgs[3 * (n // 2):]
            stats[label] = {"finite": float(torch.isfinite(imgs).all()), "stripe": float(D.stripe_score(plain).mean()),
                            "ring": float(D.ring_score(ring).mean()), "background": float(D.background_brightness(plain).mean())}
            log(f"samples {label}: " + ", ".join(f"{k} {v:.3f}" for k, v in stats[label].items()))
    save_grid(rows, out_png, "KSampler (euler, 15 steps, cfg 2); columns: disc, square, bar (x{0}), red ring (x{1})".format(n // 2, n))
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evidence.build_zoo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ZOO_DIR)
    ap.add_argument("--only", nargs="*", help="jobs to run (default: all): source unrelated_c descendant_a turbo … lora_<style|concept>_<model>")
    ap.add_argument("--scale", type=float, default=1.0, help="scale every step count (a smoke run: 0.05)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--check-samples", action="store_true", help="only sample the zoo in --out through the KSampler")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.check_samples:
        check_samples(args.out, EVIDENCE_DIR / "zoo_samples.png")
        return 0
    recipe = Recipe().scaled(args.scale) if args.scale != 1.0 else Recipe()
    rj = json.dumps(recipe.__dict__)
    save_conditioning(args.out)
    stages = [["source", "unrelated_c", "sibling_c"],
              ["descendant_a", "descendant_a_near", "descendant_b", "ladder_mid", "ladder_far", "turbo"]
              + [f"lora_{l}_{m}" for m in ("source", "unrelated_c") for l in LORAS],
              [f"lora_{l}_{m}" for m in ("descendant_a", "descendant_a_near", "descendant_b", "ladder_mid", "ladder_far", "sibling_c")
               for l in LORAS]]
    wanted = set(args.only) if args.only else None
    t_all = time.time()
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx) as pool:
        for stage in stages:
            jobs = [j for j in stage if wanted is None or j in wanted]
            for name, secs in pool.map(job, jobs, [str(args.out)] * len(jobs), [rj] * len(jobs)):
                log(f"done {name} in {secs:.0f} s")
    log(f"zoo built in {time.time() - t_all:.0f} s → {args.out}")
    total = sum(f.stat().st_size for f in args.out.glob("*.safetensors"))
    log(f"zoo size {total / 1e6:.2f} MB")
    if wanted is None and args.out == ZOO_DIR:
        check_samples(args.out, EVIDENCE_DIR / "zoo_samples.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
