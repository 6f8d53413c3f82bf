"""Transfer to a turbo target, scored in the turbo's own few-step sampling.

    cd <repo> && nice -n 5 .venv/bin/python -m evidence.turbo     # style + concept, 3 seeds → evidence/turbo.json + results.md section
    .venv/bin/python -m evidence.turbo --report                    # only rewrite the results.md section from evidence/turbo.json

People train LoRAs on a base and run them on its distilled few-step "turbo"; nobody trains a LoRA
on the turbo, so there is no trained-on-target end for "gap closed". The reference is instead what
the LoRA does where it was made: the source sampled with the full schedule (KSampler euler,
``normal``, 15 steps, cfg 2, as everywhere in the protocol). The turbo is sampled with its own
schedule (:data:`evidence.build_zoo.TURBO_SAMPLING`: euler, ``sgm_uniform``, 4 steps, cfg 1).

Definitions (per evaluation seed s, same seeds and prompts on both sides; ``score`` is the
protocol's detector: diagonal-stripe energy share for the style LoRA on the plain prompts
disc / square / bar, red-ring score for the concept LoRA on the ring prompt):

* reference gain ``R_s = score(source + LoRA, full schedule) − score(source, full schedule)``;
* ``gap closed (turbo) = (score(turbo + transferred LoRA) − score(turbo alone)) / R_s``, both turbo
  scores in the turbo's few-step sampling: 0 = no effect, 1 = the LoRA's full effect as seen on the
  source, above 1 = stronger than on the source;
* ``MSE → source+LoRA``: pixel MSE between the method's turbo samples and the source + LoRA
  full-schedule samples of the same seed and prompt (the turbo is distilled from the source's path,
  so the same noise gives a comparable image: this checks effect and content together); ``feature
  dist`` is the same on :func:`evidence.data.features`; ``bg`` the border brightness (content kept).

Methods: :data:`METHODS`; every engine mode that ``prolora_core.projection.MODES`` offers among
:data:`ENGINE_MODES` is run, so a new engine mode (``casa``) becomes one more row by being listed
there. Transfers go through the engine (name pairing: the turbo keeps the source's layout), samples
through ComfyUI's LoRA loader and KSampler.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from . import EVIDENCE_DIR, ZOO_DIR, configure_host

configure_host()

import safetensors.torch  # noqa: E402

from prolora_core.projection import MODES  # noqa: E402

from . import data as D  # noqa: E402
from .build_zoo import TURBO_SAMPLING, ksample, save_grid, with_lora  # noqa: E402
from .lora_utils import deltas_from_kohya  # noqa: E402
from .protocol import LORAS, Zoo, delta_stats, detector, engine_transfer, mean, mstd  # noqa: E402

TURBO = "turbo"
#: Engine modes tried on the turbo, in table order; ``casa`` shows up once the engine has it.
ENGINE_MODES = ("copy", "subspace", "prolora", "prolora-full", "casa", "auto")
METHODS = ("no LoRA",) + tuple(m for m in ENGINE_MODES if m in MODES)
FULL = {}  # the protocol's full schedule: ksample's defaults (euler, normal, 15 steps, cfg 2)
BEGIN = "<!-- evidence.turbo: begin (written by `python -m evidence.turbo`) -->"
END = "<!-- evidence.turbo: end -->"
EXTRAS_MARKER = "<!-- evidence.extras:"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def classes_for(lora: str) -> tuple[int, ...]:
    return (0, 1, 2) if lora == "style" else (3,)


def sample(patcher, lora: str, seed: int, n: int, table: torch.Tensor, how: dict) -> torch.Tensor:
    """``n`` KSampler samples for the LoRA's prompts (``how``: sampling overrides of :func:`ksample`)."""
    cs = classes_for(lora)
    per = max(1, n // len(cs))
    return torch.cat([ksample(patcher, c, per, seed=1000 * seed + c, table=table, **how) for c in cs])


def score_lora(zoo: Zoo, lora: str, seeds: list[int], n: int, methods: tuple[str, ...] = METHODS,
               grid: Path | None = None, tensors: dict[str, dict] | None = None) -> list[dict]:
    """One row per method: scores per seed and the turbo gap closed (definitions in the module doc).
    ``tensors``: kohya tensors per method computed elsewhere (a trial's variants); the other methods
    are engine modes transferred here."""
    turbo = zoo.target(TURBO)
    src_lora = safetensors.torch.load_file(str(zoo.lora_path(lora, "source")))
    given = tensors or {}
    tensors = {"no LoRA": None}
    summaries: dict[str, dict] = {}
    for m in methods[1:]:
        if m in given:
            tensors[m] = given[m]
        else:
            tensors[m], summaries[m] = engine_transfer(zoo, lora, turbo, m, pairing="name")
    deltas = {m: deltas_from_kohya(v, turbo.state) if v else {} for m, v in tensors.items()}
    per = {m: {k: [] for k in ("det", "gain", "gap", "mse", "feat", "bg")} for m in methods}
    ref = {k: [] for k in ("src", "src_lora", "ref_gain", "src_fewstep_lora", "src_fewstep", "mse_turbo_src", "mse_fewstep_src")}
    first = {}
    for s in seeds:
        src_plain = sample(zoo.source.patcher, lora, s, n, zoo.table, FULL)
        src_with = sample(with_lora(zoo.source.patcher, src_lora), lora, s, n, zoo.table, FULL)
        r = detector(lora, src_with) - detector(lora, src_plain)
        ref["src"].append(detector(lora, src_plain))
        ref["src_lora"].append(detector(lora, src_with))
        ref["ref_gain"].append(r)
        # what the turbo's schedule gives on the source itself (no distillation): for orientation
        src_few = sample(zoo.source.patcher, lora, s, n, zoo.table, TURBO_SAMPLING)
        ref["src_fewstep"].append(detector(lora, src_few))
        ref["mse_fewstep_src"].append(float((src_few - src_plain).square().mean()))
        ref["src_fewstep_lora"].append(detector(lora, sample(with_lora(zoo.source.patcher, src_lora), lora, s, n, zoo.table, TURBO_SAMPLING)))
        imgs = {m: sample(with_lora(turbo.patcher, tensors[m]) if tensors[m] else turbo.patcher, lora, s, n, zoo.table, TURBO_SAMPLING)
                for m in methods}
        base = detector(lora, imgs["no LoRA"])
        ref["mse_turbo_src"].append(float((imgs["no LoRA"] - src_plain).square().mean()))
        for m in methods:
            d = detector(lora, imgs[m])
            per[m]["det"].append(d)
            per[m]["gain"].append(d - base)
            per[m]["gap"].append((d - base) / r if abs(r) > 1e-12 else float("nan"))
            per[m]["mse"].append(float((imgs[m] - src_with).square().mean()))
            per[m]["feat"].append(D.feature_distance(imgs[m], src_with))
            per[m]["bg"].append(float(D.background_brightness(imgs[m]).mean()))
        if not first:
            first = {"source+LoRA (15 steps)": src_with, "turbo (4 steps)": imgs["no LoRA"],
                     **{f"+{m}": imgs[m] for m in methods[1:]}}
    rows = []
    for m in methods:
        dc, nr = delta_stats(deltas[m], deltas["copy"]) if m != "no LoRA" and "copy" in deltas else (1.0, 0.0)
        sm = summaries.get(m)
        moved = f"{sm['transferred']}/{sm['modules']}" if sm else "0"
        rows.append(dict(lora=lora, target=TURBO, method=m, dcopy=dc, norm=nr, moved=moved, **per[m], **ref))
    log(f"{lora} → turbo: " + ", ".join(f"{r['method']} gap {mean(r['gap']):.2f}" for r in rows))
    if grid is not None and first:
        save_grid(list(first.items()), grid, f"{lora} LoRA: source (euler normal 15, cfg 2) vs turbo "
                                             f"(euler {TURBO_SAMPLING['scheduler']} {TURBO_SAMPLING['steps']}, cfg 1), seed 0")
    return rows


def format_section(rows: list[dict], meta: dict) -> str:
    det_name = {"style": "stripe score", "concept": "ring score"}
    out = [BEGIN, "## Turbo target: transfer scored in the turbo's own few-step sampling\n",
           "`zoo/turbo.safetensors` is a few-step student of `source` (trajectory-distilled: one euler step of its "
           f"schedule — KSampler euler, `{TURBO_SAMPLING['scheduler']}`, {TURBO_SAMPLING['steps']} steps, cfg "
           f"{TURBO_SAMPLING['cfg']:g} — lands on the source's guided path; see `zoo/README.md`). No LoRA is trained on "
           "a turbo, so the reference is the LoRA's effect on the source in the full schedule (euler, normal, 15 "
           "steps, cfg 2): **gap closed (turbo) = (score(turbo + transferred LoRA) − score(turbo alone)) / "
           "(score(source + LoRA) − score(source alone))**, per seed, the turbo in its few-step sampling, same seeds "
           "and prompts. MSE / feature dist: turbo samples against the source + LoRA full-schedule samples of the same "
           "seed (lower: closer to what the LoRA gives on the source). "
           f"Seeds: {meta['seeds']}; {meta['n']} samples per method and seed. Command: `{meta['command']}` "
           f"({meta['secs']:.0f} s).\n"]
    for lora in dict.fromkeys(r["lora"] for r in rows):
        rs = [r for r in rows if r["lora"] == lora]
        r0 = rs[0]
        out.append(f"\n#### {lora} LoRA → turbo ({det_name[lora]})\n")
        out.append(f"source alone {mstd(r0['src'])}, source + LoRA {mstd(r0['src_lora'])} (reference gain "
                   f"{mstd(r0['ref_gain'])}); for orientation, the source itself in the turbo's 4-step cfg-1 sampling: "
                   f"alone {mstd(r0['src_fewstep'])}, + LoRA {mstd(r0['src_fewstep_lora'])}. Distillation check (no LoRA, "
                   f"pixel MSE to the source's full-schedule samples): turbo in 4 steps {mstd(r0['mse_turbo_src'])}, the "
                   f"source itself in the same 4-step cfg-1 sampling {mstd(r0['mse_fewstep_src'])}.\n")
        out.append(f"| method | {det_name[lora]} | gain over turbo alone | gap closed (turbo) | MSE → source+LoRA "
                   "| feature dist → source+LoRA | bg | Δcopy | norm | moved |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in rs:
            out.append(f"| {r['method']} | {mstd(r['det'])} | {mstd(r['gain'])} | {mstd(r['gap'])} | {mstd(r['mse'])} "
                       f"| {mstd(r['feat'])} | {mstd(r['bg'])} | {r['dcopy']:.3f} | {r['norm']:.3f} | {r['moved']} |")
    if meta.get("note"):
        out.append("\n" + meta["note"])
    out.append(END)
    return "\n".join(out)


def write_section(md_path: Path, section: str) -> None:
    """Put ``section`` into ``results.md``: in place of an earlier one, else before the extras' marker
    (so `evidence.extras report` keeps it), else at the end. Atomic (temp file, then rename)."""
    md = md_path.read_text() if md_path.is_file() else ""
    if BEGIN in md and END in md:
        head, rest = md.split(BEGIN, 1)
        md = head + section + rest.split(END, 1)[1]
    elif EXTRAS_MARKER in md:
        i = md.index(EXTRAS_MARKER)
        md = md[:i] + section + "\n\n" + md[i:]
    else:
        md = md.rstrip("\n") + "\n\n" + section + "\n"
    tmp = md_path.with_suffix(".md.tmp")
    tmp.write_text(md)
    tmp.replace(md_path)


NOTE = EVIDENCE_DIR / "turbo_note.md"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evidence.turbo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", type=Path, default=ZOO_DIR)
    ap.add_argument("--out", type=Path, default=EVIDENCE_DIR, help="turbo.json, grids and the results.md section go here")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n-samples", type=int, default=24)
    ap.add_argument("--loras", nargs="*", default=list(LORAS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", action="store_true", help="only rewrite the results.md section from <out>/turbo.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    js = args.out / "turbo.json"
    if args.report:
        j = json.loads(js.read_text())
        rows, meta = j["rows"], j["meta"]
    else:
        t0 = time.time()
        zoo = Zoo(args.zoo)
        seeds = list(range(args.seeds))
        rows = []
        for lora in args.loras:
            rows += score_lora(zoo, lora, seeds, args.n_samples, grid=args.out / f"grid_{lora}_turbo.png")
        cmd = "python -m evidence.turbo" + ("" if args.seeds == 3 else f" --seeds {args.seeds}") + \
              ("" if args.n_samples == 24 else f" --n-samples {args.n_samples}") + \
              ("" if args.loras == list(LORAS) else " --loras " + " ".join(args.loras))
        meta = {"seeds": len(seeds), "n": args.n_samples, "command": cmd, "secs": time.time() - t0,
                "sampling": TURBO_SAMPLING}
        tmp = js.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        tmp.replace(js)
    if NOTE.is_file() and args.out == EVIDENCE_DIR:
        meta = {**meta, "note": NOTE.read_text().strip()}
    section = format_section(rows, meta)
    if args.out == EVIDENCE_DIR:
        write_section(args.out / "results.md", section)
    else:
        (args.out / "turbo.md").write_text(section + "\n")
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
