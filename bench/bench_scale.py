"""ProLoRA at scale, side by side in one run: similarity vs name pairing, batched vs per-module bases,
and Flux-dev / Wan-14B scale figures.

Run from the repository root::

    .venv/bin/python -m bench.bench_scale                       # CPU, ~5 min on 2 cores once its data exist
    python3 -m bench.bench_scale --device cuda                  # the GPU run (bench/run_gpu2.sh)

Parts (``--parts``, default all), each timed phase in a fresh child process (its own peak memory):

* ``pairing``: the CLI (``transfer``) on ``--scale sdxl-part`` (314 of SDXL's modules with their
  real shapes, synthetic gapped fp16 weights; bench/shapes.py), name pairing and similarity pairing,
  each cold (empty cache, LoRA A) then warm (LoRA B); the ratio similarity / name, the longest time
  without a progress call, and how many pairs similarity pairing chose differently from the names
  (the target keeps every name, so the right answer is the name pair).
* ``batch``: the bases of every weight of both files of the same data, no cache: batched
  (``BasisProvider.prefetch``: stacked by shape, read-ahead thread) vs per-module
  (``BasisProvider.get`` one at a time).
* ``flux``, ``wan``: Flux-dev (12 B) and Wan 2.1 14 B key layouts and shapes from ComfyUI's own
  classes built on the meta device (``bench/layouts.json``, ``python -m bench.bench_scale
  --refresh-layouts`` rebuilds it); synthetic gapped fp16 weights of the FIRST block of each kind
  only (Flux: ``double_blocks.0`` + ``single_blocks.0``; Wan: ``blocks.0``), written to disk and
  streamed; bases batched vs per-module, then **extrapolated** to all blocks by weight entries
  (the randomized range finder costs O(m·n·l) per iteration, and the gapped spectrum converges in
  the same 2 iterations everywhere). Reading is from the OS page cache, as in bench_transfer.

Not a test: nothing here asserts on timings.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .bench_transfer import fmt_s, log, run_phase

GOAL_PAIRING, GOAL_SILENCE = 1.5, 5.0


def data_dir(opts: argparse.Namespace, scale: str) -> Path:
    return Path(opts.data_dir) / f"{scale}-gapped-float16-rho0.005-s0"


def generate(opts: argparse.Namespace, scale: str, work: Path) -> dict:
    return run_phase("generate", {"folder": str(data_dir(opts, scale)), "device": opts.device, "scale": scale, "spectrum": "gapped",
                                  "weight_dtype": "float16", "perturbation": 0.005, "seed": 0, "regenerate": False,
                                  "threads": opts.threads}, work, f"generate-{scale}")


def part_pairing(opts: argparse.Namespace, work: Path) -> dict:
    folder = data_dir(opts, "sdxl-part")
    out: dict = {}
    for pairing in ("name", "similarity"):
        cache = work / f"cache-{pairing}"
        shutil.rmtree(cache, ignore_errors=True)  # cold: an empty cache
        for run, lora in (("cold", "lora_a"), ("warm", "lora_b")):
            name = f"{pairing}-{run}"
            out[name] = run_phase("engine", {"folder": str(folder), "device": opts.device, "mode": "prolora", "threads": opts.threads,
                                             "cache": str(cache), "threshold": 0.8, "pairing": pairing, "lora": f"{lora}.safetensors",
                                             "out": str(work / f"{name}.safetensors"), "report": str(work / f"{name}.json")}, work, name)
            log(f"pairing {name}: {fmt_s(out[name]['seconds'])} s, svd_computed={out[name]['svd_computed']}, "
                f"longest silence {out[name]['silence']:.1f} s")
    return out


def part_bases(opts: argparse.Namespace, scale: str, work: Path) -> dict:
    out = {}
    for how in ("per-module", "batched"):
        name = f"bases-{scale}-{how}"
        out[how] = run_phase("bases", {"folder": str(data_dir(opts, scale)), "device": opts.device, "threads": opts.threads,
                                       "batched": how == "batched", "batch_mb": opts.batch_mb}, work, name)
        log(f"{scale} bases {how}: {fmt_s(out[how]['seconds'])} s for {out[how]['bases']} bases")
    return out


def mib(p: dict) -> str:
    s = f"{p['peak_anon_mib']:.0f}"
    return s + (f" / GPU {p['peak_gpu_mib']:.0f}" if "peak_gpu_mib" in p else "")


def render(res: dict, opts: argparse.Namespace) -> str:
    from .shapes import block_layout, describe_scale

    lines = [f"## ProLoRA at scale (`python -m bench.bench_scale --device {opts.device}`)", "",
             f"{platform.machine()}, {os.cpu_count()} CPU cores{', ' + res['gpu'] if res.get('gpu') else ''}; torch {res['torch']}, "
             f"{res['threads']} CPU thread(s) per phase; synthetic gapped fp16 weights (bench/synth.py), k = min(64, d // 4), engine defaults "
             f"(randomized, oversampling 16, tol 1e-5); batch budget {res.get('batch_mb') or 'the default (512 MB on CPU, 2048 MB on CUDA)'} MB. "
             "Peak memory = the phase's own anonymous RSS high-water (sampled every 10 ms), MiB; GPU = peak allocated. "
             "Seconds exclude interpreter start and imports.", ""]
    if "pairing" in res:
        p = res["pairing"]
        lines += [f"### Similarity vs name pairing: {describe_scale('sdxl-part')}, threshold 0.8, CLI `transfer`", "",
                  "| run | name pairing s | similarity pairing s | similarity / name | longest progress silence s while matching (name / similarity) | "
                  "after the last progress call s: projection + output (name / similarity) | "
                  "bases computed (name / similarity) | peak MiB (name / similarity) |", "|---|---|---|---|---|---|---|---|"]
        for run in ("cold", "warm"):
            n, s = p[f"name-{run}"], p[f"similarity-{run}"]
            lines.append(f"| {run} | {fmt_s(n['seconds'])} | {fmt_s(s['seconds'])} | **{s['seconds'] / n['seconds']:.2f}×** | "
                         f"{n['silence']:.1f} / {s['silence']:.1f} | {n.get('tail', float('nan')):.1f} / {s.get('tail', float('nan')):.1f} | {n['svd_computed']} / {s['svd_computed']} | {mib(n)} / {mib(s)} |")
        sim, name = p["similarity-cold"]["pairs"], p["name-cold"]["pairs"]
        differ = sum(sim.get(k) != v for k, v in name.items())
        lines += ["", f"- Pairs chosen by similarity that differ from the name pairs: **{differ}/{len(name)}** (the target keeps every name, "
                  "so the name pair is the right answer); transferred: "
                  f"{p['similarity-cold']['transferred']}/{p['similarity-cold']['modules']} (similarity), "
                  f"{p['name-cold']['transferred']}/{p['name-cold']['modules']} (name).",
                  f"- Goals: similarity ≤ {GOAL_PAIRING:g}× name cold and warm: "
                  + ", ".join(f"{run} {p[f'similarity-{run}']['seconds'] / p[f'name-{run}']['seconds']:.2f}× "
                              f"({'met' if p[f'similarity-{run}']['seconds'] <= GOAL_PAIRING * p[f'name-{run}']['seconds'] else 'NOT met'})"
                              for run in ("cold", "warm"))
                  + f"; no progress silence over {GOAL_SILENCE:g} s while matching: longest {max(r['silence'] for r in p.values()):.1f} s "
                  f"({'met' if max(r['silence'] for r in p.values()) <= GOAL_SILENCE else 'NOT met'}); the projection and the output "
                  f"after it report no progress (up to {max(r.get('tail', 0.0) for r in p.values()):.1f} s).", ""]
    rows = []
    for scale, label in (("sdxl-part", "SDXL part (314 modules)"), ("flux-dev", "Flux-dev"), ("wan-14b", "Wan 2.1 14B")):
        b = res.get(f"bases-{scale}")
        if not b:
            continue
        per, bat = b["per-module"], b["batched"]
        extra = "—"
        if scale in ("flux-dev", "wan-14b"):
            blocks = block_layout(scale)
            total = 2 * sum(m * n for _, (m, n) in blocks)  # source and target
            factor = total / bat["elements"]
            gib = total * 2 / 2**30
            cache_gib = 2 * sum((m + n) * min(64, min(m, n) // 4) * 4 for _, (m, n) in blocks) / 2**30
            extra = (f"all {len(blocks)} block weights × 2 models ({gib:.1f} GiB fp16 to read, cache {cache_gib:.2f} GiB): "
                     f"≈ **{fmt_s(bat['seconds'] * factor)} s** batched, ≈ {fmt_s(per['seconds'] * factor)} s per-module (×{factor:.1f}, extrapolated)")
        rows.append(f"| {label} | {per['bases']} | {bat['elements'] / 1e9:.2f} G | {fmt_s(per['seconds'])} | {fmt_s(bat['seconds'])} | "
                    f"**{per['seconds'] / bat['seconds']:.2f}×** | {per['silence']:.1f} / {bat['silence']:.1f} | {mib(per)} / {mib(bat)} | "
                    f"{bat['iterations'][0]}–{bat['iterations'][1]} | {bat['worst_uncertainty']:.1e} | {extra} |")
    if rows:
        lines += ["### Batched vs per-module bases (both files, no cache)", "",
                  "| weights | bases | entries | per-module s | batched s | speed-up | longest silence s (per-module / batched) | "
                  "peak MiB (per-module / batched) | iterations | worst uncertainty (est. sin θ) | whole model |",
                  "|---|---|---|---|---|---|---|---|---|---|---|", *rows, "",
                  "- Flux-dev and Wan-14B: the layouts are ComfyUI's (" + ", ".join(f"{f}: {describe_scale(f)}" for f in ("flux-dev", "wan-14b")
                                                                            if f"bases-{f}" in res) + "); "
                  "only the first block of each kind is generated and timed, the whole-model figure scales it by weight entries.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="pairing,batch,flux,wan")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads per phase (default 1 on CPU, torch's own with cuda)")
    ap.add_argument("--batch-mb", type=float, default=None, help="batch budget (default: prolora_core.match.DEFAULT_BATCH_MB for the device)")
    ap.add_argument("--data-dir", default=os.environ.get("PROLORA_BENCH_DIR", str(Path(tempfile.gettempdir()) / "prolora-bench")))
    ap.add_argument("--out", default=None, help="markdown output (default bench/results-scale.md, -cuda.md on CUDA)")
    ap.add_argument("--refresh-layouts", action="store_true", help="rebuild bench/layouts.json from ComfyUI's classes (needs .comfyui) and exit")
    ap.add_argument("--render-only", action="store_true")
    opts = ap.parse_args(argv)
    import torch

    if opts.refresh_layouts:
        from .shapes import refresh_layouts

        refresh_layouts()
        return 0
    if opts.threads is None:
        opts.threads = 1 if opts.device == "cpu" else 0
    parts = [p.strip() for p in opts.parts.split(",") if p.strip()]
    work = Path(opts.data_dir) / f"scale-run-{opts.device}"
    work.mkdir(parents=True, exist_ok=True)
    result_path = work / "result.json"
    if opts.render_only:
        res = json.loads(result_path.read_text())
    else:
        res = json.loads(result_path.read_text()) if result_path.exists() else {}  # parts not run now keep their last figures
        res |= {"torch": torch.__version__, "threads": opts.threads or torch.get_num_threads(), "batch_mb": opts.batch_mb,
               "gpu": torch.cuda.get_device_name(0) if opts.device == "cuda" else ""}
        t0 = time.perf_counter()
        if "pairing" in parts or "batch" in parts:
            generate(opts, "sdxl-part", work)
        if "pairing" in parts:
            res["pairing"] = part_pairing(opts, work)
        if "batch" in parts:
            res["bases-sdxl-part"] = part_bases(opts, "sdxl-part", work)
        for part, family in (("flux", "flux-dev"), ("wan", "wan-14b")):
            if part in parts:
                g = generate(opts, family, work)
                log(f"{family}: data {'re-used' if g['reused'] else 'generated in ' + fmt_s(g['seconds']) + ' s'}")
                res[f"bases-{family}"] = part_bases(opts, family, work)
        res["seconds"] = time.perf_counter() - t0
        result_path.write_text(json.dumps(res, indent=1))
    text = render(res, opts)
    out = Path(opts.out or f"bench/results-scale{'-cuda' if opts.device == 'cuda' else ''}.md")
    out.write_text(text + "\n")
    print(text, flush=True)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
