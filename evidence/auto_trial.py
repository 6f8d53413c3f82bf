"""A trial (issue 12, step 3): pick the mode per module from the target's departure — a rule users can read.

    cd <repo> && nice -n 10 .venv/bin/python -m evidence.auto_trial features          # per-target feature quantiles
    nice -n 10 .venv/bin/python -m evidence.auto_trial protocol style concept         # loss / in-domain gaps → $AUTO_OUT (json)
    nice -n 10 .venv/bin/python -m evidence.auto_trial turbo style concept            # turbo gap closed (few-step samples)
    nice -n 10 .venv/bin/python -m evidence.auto_trial identity                       # engine mode auto = the mode it chose, per pair

`casa` beats Copy where the target departs moderately from the source (descendant A, pruned B) and
loses to it on ``sibling_c`` (the source's init trained like C: Φ passes, but the weights are not
"source + drift"). The rule decides per module (only modules that pass the Φ filter, as in every
projecting mode) from two numbers of that module (``m × n``, conv weights flattened):

* ``rel = ‖W_t − W_s‖_F / ‖W_s‖_F``, the target's departure relative to the source weight;
* ``seen = ‖P_B (W_t − W_s) P_A‖_F / ‖ΔW‖_F``, the departure inside the LoRA's own column space
  (``P_B`` onto span(up)) and row space (``P_A`` onto span(downᵀ)), relative to the update;
* ``median rel``: the median of ``rel`` over the LoRA's modules (one choice for the whole target).

A variant ``casa≤r0→X`` writes `casa`'s update where ``rel ≤ r0`` and otherwise ``X``: ``copy``
(the source ``ΔW`` unchanged on the paired target module) or ``prolora-full``. Variants
``casa|seen≤s0→X`` use ``seen`` instead. Every variant's output is assembled from the engine's own
outputs (``copy``-on-pair = the source LoRA's tensors renamed to the paired module), so nothing here
re-implements a mode. Metrics: the protocol's gap closed on the LoRA's data and in the target's
domain (3 evaluation seeds, 192 images; no samples), and for the turbo the turbo gap closed of
``evidence.turbo`` (3 seeds, 24 few-step samples each).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from . import ZOO_DIR, configure_host

configure_host()

import safetensors.torch  # noqa: E402

from prolora_core.report import TransferResult  # noqa: E402

from .lora_utils import deltas_from_kohya  # noqa: E402
from .protocol import PAIRING, Evaluator, Zoo, delta_stats, mean, mstd, run_engine  # noqa: E402

PREFIX = "model.diffusion_model."
TARGETS = ("descendant_a_near", "descendant_a", "descendant_b", "sibling_c", "unrelated_c")
#: (label, feature, threshold, fallback mode)
VARIANTS = [(f"casa≤{r0:g}→copy", "rel", r0, "copy") for r0 in (0.10, 0.13, 0.16)] + \
           [("casa≤0.13→prolora-full", "rel", 0.13, "prolora-full")] + \
           [(f"casa|seen≤{s0:g}→copy", "seen", s0, "copy") for s0 in (0.05, 0.08)] + \
           [("casa|median rel≤0.13→copy", "median_rel", 0.13, "copy")]
if os.environ.get("AUTO_VARIANTS"):  # e.g. "casa≤0.13→copy": only these variants
    VARIANTS = [v for v in VARIANTS if v[0] in os.environ["AUTO_VARIANTS"].split(",")]
#: the zoo to read (``evidence.lora_seeds`` writes zoos that differ in one source LoRA)
ZOO = Path(os.environ.get("AUTO_ZOO", str(ZOO_DIR)))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def stem(weight_key: str) -> str:
    return "lora_unet_" + weight_key.removeprefix(PREFIX).removesuffix(".weight").replace(".", "_")


def features(zoo: Zoo, lora: str, res: TransferResult, target) -> dict[str, dict]:
    """Per transferred module (target kohya stem): source stem, Φ, ``rel`` and ``seen`` (module doc)."""
    src = safetensors.torch.load_file(str(zoo.lora_path(lora, "source")))
    out = {}
    for m in res.modules:
        if not m.transferred or m.target_key is None or m.source_key is None:
            continue
        ws = zoo.source.weights.get(m.source_key).double()
        wt = target.weights.get(m.target_key).double()
        ws2 = ws.reshape(ws.shape[0], -1)
        d = wt.reshape(ws2.shape) - ws2
        s = stem(m.source_key)
        up = src[s + ".lora_up.weight"].double().reshape(ws2.shape[0], -1)
        down = src[s + ".lora_down.weight"].double().reshape(up.shape[1], -1)
        scale = float(src[s + ".alpha"]) / up.shape[1] if s + ".alpha" in src else 1.0
        qb, _ = torch.linalg.qr(up)
        qa, _ = torch.linalg.qr(down.T)
        dw = scale * up @ down
        out[stem(m.target_key)] = dict(source_stem=s, phi=min(m.similarity_u or 0.0, m.similarity_v or 0.0),
                                       rel=float(d.norm() / ws2.norm()),
                                       seen=float((qb.T @ d @ qa).norm() / dw.norm()))
    return out


def assemble(zoo: Zoo, lora: str, feats: dict[str, dict], outs: dict[str, dict], feature: str, thr: float,
             fallback: str) -> tuple[dict, int]:
    """Kohya tensors of one variant (per module ``casa``'s where ``feature ≤ thr``, else ``fallback``'s)
    and how many modules took ``casa``'s."""
    src = safetensors.torch.load_file(str(zoo.lora_path(lora, "source")))
    tensors: dict[str, torch.Tensor] = {}
    if feature == "median_rel" and feats:  # one choice for the whole target
        med = statistics.median(f["rel"] for f in feats.values())
        feats = {k: {**f, "median_rel": med} for k, f in feats.items()}
    n_casa = 0
    for tstem, f in feats.items():
        if f[feature] <= thr:
            n_casa += 1
            tensors.update({k: v for k, v in outs["casa"].items() if k.startswith(tstem + ".")})
        elif fallback == "copy":  # the source update unchanged on the paired module
            tensors.update({tstem + k[len(f["source_stem"]):]: v for k, v in src.items() if k.startswith(f["source_stem"] + ".")})
        else:
            tensors.update({k: v for k, v in outs[fallback].items() if k.startswith(tstem + ".")})
    return tensors, n_casa


def transfers(zoo: Zoo, lora: str, tname: str) -> tuple[dict[str, dict], dict[str, dict]]:
    """Engine outputs (copy by name, prolora-full and casa with the target's pairing) and the features."""
    t = zoo.target(tname)
    pairing = PAIRING.get(tname, "name")
    lf = zoo.source_lora(lora)
    outs, res_casa = {}, None
    for mode in ("copy", "prolora-full", "casa"):
        res = run_engine(lf, zoo.source.weights, t.weights, mode, pairing="name" if mode == "copy" else pairing)
        outs[mode] = res.tensors
        if mode == "casa":
            res_casa = res
    return outs, features(zoo, lora, res_casa, t)


def variant_tensors(zoo: Zoo, lora: str, tname: str) -> tuple[dict[str, dict], dict[str, dict], dict[str, str]]:
    """All methods' kohya tensors, the features, and per variant how many modules took casa."""
    outs, feats = transfers(zoo, lora, tname)
    methods = dict(outs)
    share = {}
    for label, feat, thr, fb in VARIANTS:
        methods[label], n = assemble(zoo, lora, feats, outs, feat, thr, fb)
        share[label] = f"{n}/{len(feats)}"
    return methods, feats, share


def cmd_features() -> None:
    zoo = Zoo(ZOO)
    for lora in ("style", "concept"):
        for tname in TARGETS[:-1] + ("turbo", "ladder_mid", "ladder_far"):
            _, feats = transfers(zoo, lora, tname)
            if not feats:
                print(f"{lora} {tname}: no module transferred")
                continue
            for key in ("rel", "seen", "phi"):
                xs = sorted(f[key] for f in feats.values())
                q = statistics.quantiles(xs, n=4)
                print(f"{lora:8s} {tname:18s} {key:5s} min {xs[0]:.3f} q1 {q[0]:.3f} med {q[1]:.3f} q3 {q[2]:.3f} max {xs[-1]:.3f} (n {len(xs)})",
                      flush=True)


def cmd_identity() -> None:
    """Engine mode ``auto`` on every zoo pair, against the engine mode (or No LoRA) it says it chose:
    the tensors must be identical, so its protocol and turbo numbers are that mode's rows."""
    zoo = Zoo(ZOO)
    for lora in ("style", "concept"):
        for tname in ("descendant_a_near", "descendant_a", "descendant_b", "turbo", "sibling_c", "ladder_mid", "ladder_far", "unrelated_c"):
            t = zoo.target(tname)
            pairing = PAIRING.get(tname, "name")
            a = run_engine(zoo.source_lora(lora), zoo.source.weights, t.weights, "auto", pairing=pairing)
            chosen = a.modules[0].reason.split("auto: ")[1].split(";")[0].split(",")[0]
            mode = chosen if chosen in ("casa", "copy") else None
            ref = run_engine(zoo.source_lora(lora), zoo.source.weights, t.weights, mode, pairing="name" if mode == "copy" else pairing) if mode else None
            same = (not a.tensors) if ref is None else (
                set(a.tensors) == set(ref.tensors) and all(torch.equal(a.tensors[k], ref.tensors[k]) for k in a.tensors))
            print(f"{lora} → {tname}: {a.modules[0].reason}; identical to {mode or 'No LoRA'}: {same}", flush=True)


def cmd_protocol(loras: list[str], targets: list[str], n_loss: int = 192, seeds: int = 3) -> list[dict]:
    zoo = Zoo(ZOO)
    ev = Evaluator(zoo, n_loss, list(range(seeds)))
    rows = []
    for lora in loras:
        for tname in targets:
            t = zoo.target(tname)
            trained = deltas_from_kohya(safetensors.torch.load_file(str(zoo.lora_path(lora, tname))), t.state)
            ends = ev.ends(t, trained, lora)
            methods, _, share = variant_tensors(zoo, lora, tname)
            copy_d = deltas_from_kohya(methods["copy"], t.state)
            for m, tensors in methods.items():
                d = deltas_from_kohya(tensors, t.state) if tensors else {}
                g, ig = ev.gaps(t, d, lora, ends)
                dc, _ = delta_stats(d, copy_d)
                rows.append(dict(lora=lora, target=tname, method=m, gap=g, igap=ig, dcopy=dc, casa_modules=share.get(m)))
            log(f"{lora} → {tname}: " + ", ".join(f"{r['method']} {mean(r['gap']):.3f}/{mean(r['igap']):.3f}"
                                                  for r in rows if r["lora"] == lora and r["target"] == tname))
    return rows


def cmd_turbo(loras: list[str], seeds: int = 3, n: int = 24) -> list[dict]:
    from .turbo import score_lora
    zoo = Zoo(ZOO)
    rows = []
    for lora in loras:
        methods, _, share = variant_tensors(zoo, lora, "turbo")
        rs = score_lora(zoo, lora, list(range(seeds)), n, methods=("no LoRA",) + tuple(methods), tensors=methods)
        for r in rs:
            r["casa_modules"] = share.get(r["method"])
        rows += rs
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(1)
    what, loras = argv[0], argv[1:] or ["style", "concept"]
    out = Path(os.environ.get("AUTO_OUT", f"/tmp/auto_{what}.json"))
    if what in ("features", "identity"):
        cmd_features() if what == "features" else cmd_identity()
        return 0
    t0 = time.time()
    targets = os.environ.get("AUTO_TARGETS", " ".join(TARGETS)).split()
    rows = cmd_protocol(loras, targets) if what == "protocol" else cmd_turbo(loras)
    out.write_text(json.dumps({"secs": time.time() - t0, "rows": rows}, indent=1))
    for r in rows:
        print(f"{r['lora']:8s} {r['target']:18s} {r['method']:28s} {mstd(r['gap']):>16s} {mstd(r.get('igap', [])):>16s} "
              f"casa on {r.get('casa_modules')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
