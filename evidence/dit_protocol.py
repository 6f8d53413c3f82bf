"""The transfer protocol on the DiT zoo (``zoo/dit/``, built by ``evidence.dit_zoo``).

    nice -n 10 .venv/bin/python -m evidence.dit_protocol            # → results.md section, dit_results.json
    .venv/bin/python -m evidence.dit_protocol --quick                # < 60 s smoke on the shipped zoo (no files written)

1. **Φ of each member against the source**: for every 2-D weight the two share by name and shape,
   Φ = min(Φ_U, Φ_V) of their top-k singular subspaces (k = the engine's default rule); the table
   gives the median and how many pass the default threshold 0.8. The sibling (the source's init,
   another data stream) must fall clearly below the descendants for the zoo to say more than
   "shared init".
2. **Gap closed** per target and LoRA (style, concept), for each of the 3 source LoRAs (training
   seeds): No LoRA (0), Copy, Subspace, Eq. 3 (``prolora``), ``prolora-full``, ``casa`` (engine
   modes, slice bases: the diffusers LoRA's q/k/v/proj_mlp modules sit on row slices of the fused
   weights), ``prolora-full`` and ``casa`` with **whole-weight bases** (the same ΔW in kohya fused
   layout, ``dit_zoo.kohya_fused``), and the LoRA trained on the target (1). Gap closed on the
   flow loss of the LoRA's own data and in the target's own domain (loss(plain) − loss(edited), as
   ``evidence.protocol``); mean ± std over the 3 LoRA seeds (one fixed evaluation draw).

Every ΔW is what ComfyUI's own loader makes of a LoRA file (``comfy.lora.load_lora`` with the
model's ``model_lora_keys_unet`` map, applied by ``calculate_weight``); every transfer goes through
the engine (``prolora_core.transfer``), placed on ComfyUI's key map (slices as virtual keys).
The gap arithmetic and the in-domain measure are ``evidence.protocol``'s (:class:`FlowEvaluator`
subclasses its ``Evaluator``; only the draws and the loss are the flow model's).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from . import EVIDENCE_DIR, configure_host

configure_host()

from prolora_core.basis import compute_basis, default_rank  # noqa: E402
from prolora_core.lora import LoraFile, parse_state_dict  # noqa: E402
from prolora_core.plan import Planned  # noqa: E402
from prolora_core.similarity import basis_similarity  # noqa: E402
from prolora_core.slices import place_key  # noqa: E402
from prolora_core.transfer import DEFAULT_THRESHOLD, TransferConfig, transfer  # noqa: E402
from prolora_core.weights import SafetensorsWeights  # noqa: E402
from prolora_dev import tiny_models  # noqa: E402

from . import dit_zoo as Z  # noqa: E402
from .protocol import Evaluator, Target, log, mean, mstd  # noqa: E402

METHODS = ("copy", "subspace", "prolora", "prolora-full", "casa")
WHOLE = ("prolora-full", "casa")  # also run with whole-weight bases (kohya fused file)
RESULTS_JSON = EVIDENCE_DIR / "dit_results.json"
BEGIN = "<!-- evidence.dit_protocol: begin (written by `python -m evidence.dit_protocol`) -->"
END = "<!-- evidence.dit_protocol: end -->"


class DitZoo:
    """The DiT zoo's models (``Target``: patcher, clean state, weights file, domain) and LoRA files."""

    def __init__(self, path: Path) -> None:
        import safetensors.torch

        self.dir = path
        self.table = safetensors.torch.load_file(str(path / "conditioning.safetensors"))["context"]
        self.source = self.load("dit_source")
        self.targets: dict[str, Target] = {}

    def load(self, name: str) -> Target:
        path = self.dir / f"{name}.safetensors"
        p = tiny_models.load_tiny_model(path)
        return Target(name, p, Z.state(p), SafetensorsWeights(path), Z.DOMAIN[name])

    def target(self, name: str) -> Target:
        if name not in self.targets:
            self.targets[name] = self.load(name)
        return self.targets[name]

    def lora(self, lora: str, model: str, seed: int | None = None) -> dict[str, torch.Tensor]:
        import safetensors.torch

        suffix = "" if seed is None else f"_s{seed}"
        return safetensors.torch.load_file(str(self.dir / f"lora_{lora}_{model}{suffix}.safetensors"))


class FlowEvaluator(Evaluator):
    """``evidence.protocol.Evaluator`` with the DiT zoo's draws (16-channel latents, pooled vector
    from the context) and ComfyUI's flow loss (:func:`evidence.dit_zoo.flow_loss`)."""

    def draw(self, lora: str, seed: int):
        key = (lora, seed)
        if key not in self.draws:
            x0, ctx = Z.batch(lora, self.n, 900_000 + seed, self.zoo.table)
            gen = torch.Generator().manual_seed(31 + seed)
            sigma = Z.sigmas(self.zoo.source.patcher.model, self.n, gen)
            self.draws[key] = (x0, ctx, torch.randn(x0.shape, generator=gen), sigma)
        return self.draws[key]

    def domain_draw(self, lora: str, domain: str, seed: int):
        key = (lora, domain, seed)
        if key not in self.draws:
            plain, edited, ctx = Z.domain_pair(lora, domain, self.n_dom, 700_000 + seed, self.zoo.table)
            gen = torch.Generator().manual_seed(53 + seed)
            sigma = Z.sigmas(self.zoo.source.patcher.model, self.n_dom, gen)
            self.draws[key] = (plain, edited, ctx, torch.randn(plain.shape, generator=gen), sigma)
        return self.draws[key]

    @torch.no_grad()
    def loss(self, target: Target, deltas, lora: str, seed: int) -> float:
        x0, ctx, noise, sigma = self.draw(lora, seed)
        return float(Z.flow_loss(target.patcher.model, _params(target, deltas), x0, ctx, noise, sigma).mean())

    @torch.no_grad()
    def effect(self, target: Target, deltas, lora: str, seed: int) -> float:
        plain, edited, ctx, noise, sigma = self.domain_draw(lora, target.domain, seed)
        params = _params(target, deltas)
        lp = Z.flow_loss(target.patcher.model, params, plain, ctx, noise, sigma)
        le = Z.flow_loss(target.patcher.model, params, edited, ctx, noise, sigma)
        return float((lp - le).mean())


def _params(target: Target, deltas: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The full clean state plus ΔW (never the live module weights, which ComfyUI patches in place)."""
    return {k: v + deltas[k] if deltas and k in deltas else v for k, v in target.state.items()}


def comfy_deltas(target: Target, lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dense ΔW per bare weight key: what ComfyUI's loader (``load_lora`` with the model's key map,
    ``calculate_weight``) does to ``target`` with ``lora`` at strength 1."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(target.patcher.model, {})
    patches = comfy.lora.load_lora(lora, key_map, log_missing=True)
    p = target.patcher.clone()
    p.add_patches(patches, 1.0)
    out = {}
    for k, w in tiny_models.unet_weights(p, patched=True).items():
        bare = k[len("diffusion_model."):]
        d = w - target.state[bare]
        if d.abs().max() > 0:
            out[bare] = d
    return out


def engine(lf: LoraFile, source: Target, target: Target, mode: str) -> dict[str, torch.Tensor]:
    """The engine's output LoRA tensors for ``lf`` moved from ``source`` to ``target`` in ``mode``,
    each module placed by ComfyUI's key map of the source (slices as virtual keys)."""
    import comfy.lora

    prefix = "model."  # the zoo files hold the checkpoint layout (model.diffusion_model.…)
    key_map = comfy.lora.model_lora_keys_unet(source.patcher.model, {})
    plan = []
    for mod in lf.modules.values():
        where = key_map.get(mod.name)
        key = place_key(where)
        plan.append(Planned(0, mod, None if key is None else prefix + key))
    cfg = TransferConfig(mode=mode, device="cpu")
    (res,), _ = transfer([lf], plan, source.weights, target.weights, cfg)
    return res.tensors


def lora_file(tensors: dict[str, torch.Tensor], label: str) -> LoraFile:
    return parse_state_dict(dict(tensors), label, {})


# ------------------------------------------------------------------------------------------------
# Φ
# ------------------------------------------------------------------------------------------------

def phi_table(zoo: DitZoo, targets: list[str], threshold: float = DEFAULT_THRESHOLD) -> dict[str, dict]:
    """Per target: Φ = min(Φ_U, Φ_V) of every 2-D weight shared with the source (default k)."""
    out = {}
    src = zoo.source.state
    bases = {}
    for name in targets:
        t = zoo.target(name).state
        phis = {}
        for k, w in src.items():
            if w.ndim != 2 or k not in t or t[k].shape != w.shape or min(w.shape) < 4:
                continue
            r = default_rank(*w.shape)
            if k not in bases:
                bases[k] = compute_basis(w.double(), r)
            phis[k] = basis_similarity(bases[k], compute_basis(t[k].double(), r)).phi
        vals = sorted(phis.values())
        out[name] = dict(median=statistics.median(vals), passing=sum(v >= threshold for v in vals), modules=len(vals),
                         phi={k: round(v, 4) for k, v in phis.items()})
        log(f"Φ source vs {name}: median {out[name]['median']:.3f}, {out[name]['passing']}/{len(vals)} pass {threshold}")
    return out


@torch.no_grad()
def domain_losses(zoo: DitZoo, names: list[str], n: int) -> dict[str, dict[str, float]]:
    """Flow loss of each model (the source too) on ``base`` and on ``shifted`` images (one fixed
    draw of ``n``): that every member denoises, and where the fine-tune moved."""
    out = {}
    for domain in ("base", "shifted"):
        x0, ctx = Z.batch(domain, n, 800_000, zoo.table)
        gen = torch.Generator().manual_seed(77)
        noise, sigma = torch.randn(x0.shape, generator=gen), Z.sigmas(zoo.source.patcher.model, n, gen)
        for name in ["dit_source"] + names:
            t = zoo.source if name == "dit_source" else zoo.target(name)
            out.setdefault(name, {})[domain] = float(Z.flow_loss(t.patcher.model, None, x0, ctx, noise, sigma).mean())
    return out


# ------------------------------------------------------------------------------------------------
# Gap closed
# ------------------------------------------------------------------------------------------------

def gap_rows(zoo: DitZoo, ev: FlowEvaluator, targets: list[str], loras: list[str], seeds: list[int], whole: bool = True) -> list[dict]:
    """One row per (LoRA, target, method): gap closed on the loss / in domain per LoRA seed."""
    rows = []
    s_eval = 0
    for lora in loras:
        for tname in targets:
            t = zoo.target(tname)
            no = ev.no_lora(t, lora)
            trained = comfy_deltas(t, zoo.lora(lora, tname))
            ends = ev.ends(t, trained, lora, no)
            per: dict[str, tuple[list[float], list[float]]] = {}
            for seed in seeds:
                src_lora = zoo.lora(lora, "dit_source", seed)
                lf = lora_file(src_lora, f"lora_{lora}_dit_source_s{seed}")
                runs = [(m, lf, m) for m in METHODS]
                if whole:
                    kf = lora_file(Z.kohya_fused(src_lora, Z.lora_places(zoo.source.patcher),
                                                 {k: v.shape[0] for k, v in zoo.source.state.items()}), "kohya fused")
                    runs += [(f"{m} (whole-weight bases)", kf, m) for m in WHOLE]
                for label, f, mode in runs:
                    d = comfy_deltas(t, engine(f, zoo.source, t, mode))
                    g, ig = ev.gaps(t, d, lora, ends)
                    per.setdefault(label, ([], []))
                    per[label][0].append(g[0])
                    per[label][1].append(ig[0])
            for label, (g, ig) in per.items():
                rows.append(dict(lora=lora, target=tname, method=label, gap=g, igap=ig))
            rows.append(dict(lora=lora, target=tname, method="trained", gap=[1.0], igap=[1.0],
                             no_loss=no[0][s_eval], trained_loss=ends.trained_loss[s_eval],
                             no_effect=no[1][s_eval], trained_effect=ends.trained_effect[s_eval]))
            log(f"{lora} → {tname}: " + ", ".join(f"{m} {mean(g):.2f}/{mean(ig):.2f}" for m, (g, ig) in per.items()))
    return rows


def own_copy_gap(zoo: DitZoo, ev: FlowEvaluator, lora: str, tname: str) -> tuple[float, float]:
    """Copy of the target's own trained LoRA from the target to itself: must close the gap exactly (1)."""
    t = zoo.target(tname)
    own = zoo.lora(lora, tname)
    ends = ev.ends(t, comfy_deltas(t, own), lora)
    d = comfy_deltas(t, engine(lora_file(own, "own"), t, t, "copy"))
    g, ig = ev.gaps(t, d, lora, ends)
    return g[0], ig[0]


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------

def format_report(res: dict) -> str:
    phi, rows = res["phi"], res["rows"]
    lines = [BEGIN, "## DiT zoo (tiny Flux / Chroma from ComfyUI's classes)\n",
             f"Zoo `zoo/dit/` (`python -m evidence.dit_zoo`), protocol `python -m evidence.dit_protocol` "
             f"({res['n_loss']} images per loss, LoRA seeds {res['seeds']}, ran in {res['seconds']:.0f} s). "
             "Cells: mean ± std over the source LoRA's training seeds. Whole-weight bases: the same ΔW in kohya fused "
             "layout, projected with the fused weight's bases instead of each slice's.\n",
             "### Φ against the source (every 2-D weight shared by name and shape; default k)\n",
             "| model | median Φ | modules ≥ 0.8 | flow loss on `base` | on `shifted` |", "|---|---|---|---|---|"]
    ls = res.get("losses", {})
    if "dit_source" in ls:
        lines.append(f"| dit_source | 1 | – | {ls['dit_source']['base']:.4f} | {ls['dit_source']['shifted']:.4f} |")
    for name, p in phi.items():
        lo = ls.get(name, {})
        lines.append(f"| {name} | {p['median']:.3f} | {p['passing']}/{p['modules']} | {lo.get('base', float('nan')):.4f} "
                     f"| {lo.get('shifted', float('nan')):.4f} |")
    for lora in dict.fromkeys(r["lora"] for r in rows):
        lines.append(f"\n### {lora} LoRA: gap closed on the LoRA's data / in the target's domain\n")
        targets = list(dict.fromkeys(r["target"] for r in rows if r["lora"] == lora))
        lines.append("| method | " + " | ".join(targets) + " |")
        lines.append("|---|" + "---|" * len(targets))
        for m in dict.fromkeys(r["method"] for r in rows if r["lora"] == lora):
            cells = []
            for tname in targets:
                r = next((r for r in rows if r["lora"] == lora and r["target"] == tname and r["method"] == m), None)
                cells.append("–" if r is None else f"{mstd(r['gap'])} / {mstd(r['igap'])}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if res.get("note"):
        lines.append("\n" + res["note"])
    lines.append(END)
    return "\n".join(lines)


def write_section(md: Path, section: str) -> None:
    """Put ``section`` into ``md`` between its markers (replacing an earlier one), else after the
    ``casa`` section's end (the turbo section's begin marker if there is one), else at the end."""
    text = md.read_text() if md.is_file() else ""
    if BEGIN in text and END in text:
        a, b = text.index(BEGIN), text.index(END) + len(END)
        text = text[:a] + section + text[b:]
    else:
        anchor = "<!-- evidence.turbo: begin"
        i = text.find(anchor)
        text = (text[:i] + section + "\n\n" + text[i:]) if i >= 0 else text.rstrip() + "\n\n" + section + "\n"
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(md)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    t0 = time.time()
    zoo = DitZoo(args.zoo)
    seeds = list(range(args.seeds))
    ev = FlowEvaluator(zoo, args.n_loss, [0])
    phi = phi_table(zoo, args.targets)
    losses = domain_losses(zoo, args.targets, args.n_loss)
    rows = gap_rows(zoo, ev, args.targets, args.loras, seeds, whole=not args.quick)
    own = {f"{l} → {t}": own_copy_gap(zoo, ev, l, t) for l in args.loras for t in args.targets[:1]}
    return dict(phi=phi, losses=losses, rows=rows, own_copy=own, seeds=seeds, n_loss=args.n_loss, seconds=time.time() - t0)


def merge(parts: list[dict]) -> dict:
    """One result from runs on disjoint targets (same settings): dicts united, rows concatenated in
    target order, run time = the longest run (they ran in parallel)."""
    out = dict(parts[0], phi={}, losses={}, rows=[], own_copy={})
    for p in parts:
        out["phi"].update(p["phi"])
        out["losses"].update(p["losses"])
        out["rows"] += p["rows"]
        out["own_copy"].update(p["own_copy"])
    order = {t: i for i, t in enumerate(Z.TARGETS)}
    out["rows"].sort(key=lambda r: (Z.LORAS.index(r["lora"]), order.get(r["target"], 99)))
    out["phi"] = dict(sorted(out["phi"].items(), key=lambda kv: order.get(kv[0], 99)))
    out["seconds"] = max(p["seconds"] for p in parts)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evidence.dit_protocol", description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", type=Path, default=Z.DIT_DIR)
    ap.add_argument("--quick", action="store_true", help="smoke: style LoRA, seed 0, dit_finetune and dit_sibling, 64 images, no files")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n-loss", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--targets", nargs="*", default=list(Z.TARGETS))
    ap.add_argument("--loras", nargs="*", default=list(Z.LORAS))
    ap.add_argument("--json", type=Path, default=None, help=f"raw results (full run default: {RESULTS_JSON}; --quick writes one only when given)")
    ap.add_argument("--md", type=Path, default=EVIDENCE_DIR / "results.md")
    ap.add_argument("--report", action="store_true", help="only rewrite the results.md section from the JSON")
    ap.add_argument("--merge", nargs="*", type=Path, help="merge the JSONs of earlier runs (e.g. one per target) into --json, then report")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.n_loss, args.targets, args.loras = 1, 64, ["dit_finetune", "dit_sibling"], ["style"]
    if args.json is None and not args.quick:
        args.json = RESULTS_JSON
    if args.merge:
        res = merge([json.loads(p.read_text()) for p in args.merge])
        args.json.write_text(json.dumps(res, indent=1, ensure_ascii=False))
    elif args.report:
        res = json.loads(args.json.read_text())
    else:
        res = run(args)
        if args.json is not None:
            args.json.write_text(json.dumps(res, indent=1, ensure_ascii=False))
    section = format_report(res)
    if not args.quick:
        write_section(args.md, section)
    print(section)
    print(f"own-LoRA copy gap (must be 1): {res['own_copy']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
