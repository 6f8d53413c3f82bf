"""A whole Flux-dev-size (or Wan 2.1 14B) transfer through the CLI, end to end, on synthetic weights.

Run from the repository root (the full run needs ≈ 40 GB free under ``--data-dir``)::

    nice -n 10 .venv/bin/python -m bench.bench_flux_full --data-dir /tmp/flux-full              # all 19 + 38 blocks
    nice -n 10 .venv/bin/python -m bench.bench_flux_full --blocks 2 --data-dir /tmp/flux-full-2  # a cut-down try
    nice -n 10 .venv/bin/python -m bench.bench_flux_full --family wan-14b --data-dir /tmp/wan-full

What it writes (``--data-dir``), each tensor streamed to disk as it is made, so that neither model is
ever held in memory:

* ``source.safetensors``: every tensor of ComfyUI's own ``Flux`` (``WanModel``) class built on the
  meta device with Flux-dev's (Wan 2.1 14B's) detected parameters (``bench/shapes.py`` FAMILIES), the
  real key names of a diffusion-model file (``double_blocks.0.img_attn.qkv.weight`` …, no prefix),
  in **bf16** (Flux-dev's own release; ``--source-dtype float16`` for Wan's fp16 release);
* ``target.safetensors``: the same keys, every ≥ 2-D weight in **fp8 e4m3fn** (what users run;
  norms and biases stay in the source dtype, as in the fp8 files people share);
* ``lora_a.safetensors`` (cold run), ``lora_b.safetensors`` (warm run): rank-16 kohya LoRAs
  (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``,
  bf16) on **every** 2-D weight of the repeated blocks (Flux: 19 × 10 + 38 × 3 = 304, modulation
  layers included; Wan: 40 × 10 = 400), a layout ComfyUI's key map places on the diffusion model.

Weights are structured, cheap to generate: ``W = U diag(s) Vᵀ + G / (√m + √n)`` with ``U``, ``V``
Gaussian (scaled to unit columns, near-orthonormal at these sizes), ``s`` from 100 down to 10 over
the engine's k = min(64, d // 4) directions and ``G`` Gaussian (spectral norm ≈ 1): a gap of ≈ 10 at
k; the target is ``W + 0.005·100·G' / (√m + √n)`` before the fp8 rounding; both scaled so the source's
entries have an RMS of 0.02. ``G`` and ``G'`` are windows at two seeded offsets of one pool of 2^27
Gaussian samples (cheap: no fresh 12 B-sample ``randn``). 1-D tensors: norms 1, biases 0.01·Gaussian.

Then, each in a fresh process (``bench/phases.py`` ``engine``: ``prolora_core.cli.main(["transfer",
…])``, ``--threads``, default 2), the CLI ``transfer`` **cold** (empty basis cache) with LoRA A and
**warm** (the cache of the cold run) with LoRA B, recording wall time, peak own (anonymous) memory
and peak RSS (the process's ``VmHWM``; RSS counts the mapped file pages it reads), the longest time
without a progress line, and how many modules transferred. The ComfyUI host must be importable
(``.comfyui``): the CLI detects the model from the file with ComfyUI's detection and places the
LoRA with ComfyUI's key map, as it does for a user.

Results: ``bench/results-flux-full.md`` (``-wan-full.md`` for Wan; ``--out``). ``--keep`` keeps the
data afterwards (default: deleted). Not a test: nothing here asserts on timings.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

from .bench_transfer import ROOT, fmt_s, log

RMS, LORA_RANK, LORA_ALPHA, RHO, SEED = 0.02, 16, 16.0, 0.005, 0


def full_layout(family: str, blocks: int | None) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of ComfyUI's class for ``family`` on the meta device, in state-dict order; with
    ``blocks``, only the first ``blocks`` blocks of each kind (ComfyUI then detects a shallower model)."""
    from prolora_dev.host import configure_host

    from .shapes import BLOCKS, FAMILIES

    configure_host()
    import comfy.ops
    import torch

    module, cls, params = FAMILIES[family]
    params = dict(params)
    if blocks is not None:
        for key in ("depth", "depth_single_blocks", "num_layers"):
            if key in params:
                params[key] = min(params[key], blocks)
    with torch.device("meta"):
        model = getattr(importlib.import_module(module), cls)(device="meta", operations=comfy.ops.disable_weight_init, **params)
    out = [(k, tuple(t.shape)) for k, t in model.state_dict().items()]
    prefixes = tuple(p for p, _ in BLOCKS[family])
    if not any(k.startswith(prefixes) for k, _ in out):
        raise SystemExit(f"{family}: no block weights in ComfyUI's {cls}")
    return out


def is_lora_weight(family: str, key: str, shape: tuple[int, ...]) -> bool:
    from .shapes import BLOCKS

    return key.endswith(".weight") and len(shape) == 2 and key.startswith(tuple(p for p, _ in BLOCKS[family]))


#: one Gaussian pool (2^27 float32 samples, 512 MiB) from which every weight's noise is a window at a
#: seeded offset: a fresh ``randn`` of 2 × 12 B samples would take most of the run on 2 shared cores
POOL_SIZE = 1 << 27


def noise_pool() -> "torch.Tensor":
    import torch

    return torch.randn(POOL_SIZE, generator=torch.Generator().manual_seed(SEED + 12_345))


def structured(m: int, n: int, gen, pool) -> tuple:
    """(source, target) float32 ``m × n``: low-rank with a gap at k, plus noise (see the module docstring).
    The two noise matrices are windows of ``pool`` at two seeded offsets (different offsets: uncorrelated)."""
    import torch

    k = max(1, min(64, min(m, n) // 4))
    U = torch.randn(m, k, generator=gen).div_(math.sqrt(m))
    V = torch.randn(n, k, generator=gen).div_(math.sqrt(n))
    noise = 1.0 / (math.sqrt(m) + math.sqrt(n))
    size = m * n
    if size > pool.numel():
        raise ValueError(f"a {m} × {n} weight is larger than the noise pool")
    o1, o2 = (int(o) for o in torch.randint(0, pool.numel() - size + 1, (2,), generator=gen))
    w = torch.addmm(pool[o1:o1 + size].view(m, n), U * torch.linspace(100.0, 10.0, k), V.T, beta=noise)
    c = RMS / float(w.square().mean().sqrt())
    t = torch.add(w, pool[o2:o2 + size].view(m, n), alpha=RHO * 100.0 * noise).mul_(c)
    return w.mul_(c), t


def generate(folder: Path, family: str, layout: list[tuple[str, tuple[int, ...]]], source_dtype: str) -> dict:
    """Write the two bases and the two LoRAs into ``folder`` (then ``manifest.json``); re-used while the manifest matches."""
    import torch
    from safetensors.torch import save_file

    from .synth import StreamingSafetensors

    manifest = {"family": family, "source_dtype": source_dtype, "target_dtype": "float8_e4m3fn", "rank": LORA_RANK, "rho": RHO, "seed": SEED,
                "layout": [[k, list(s)] for k, s in layout]}
    mpath = folder / "manifest.json"
    names = ("source.safetensors", "target.safetensors", "lora_a.safetensors", "lora_b.safetensors")
    if mpath.exists() and json.loads(mpath.read_text()) == manifest and all((folder / f).exists() for f in names):
        return {"reused": True, "seconds": 0.0}
    folder.mkdir(parents=True, exist_ok=True)
    mpath.unlink(missing_ok=True)
    t0 = time.perf_counter()
    src_dt = getattr(torch, source_dtype)
    src = StreamingSafetensors(folder / "source.safetensors", layout, src_dt, {"prolora_bench": "source"})
    tgt = StreamingSafetensors(folder / "target.safetensors", [(k, s, torch.float8_e4m3fn if len(s) >= 2 else src_dt) for k, s in layout],
                               src_dt, {"prolora_bench": "target"})
    loras: dict[str, dict[str, torch.Tensor]] = {"lora_a": {}, "lora_b": {}}
    done = 0
    pool = noise_pool()
    for i, (key, shape) in enumerate(layout):
        gen = torch.Generator().manual_seed(SEED * 100_003 + i)
        if len(shape) >= 2:
            m, n = shape[0], math.prod(shape[1:])
            w, t = structured(m, n, gen, pool)
            w, t = w.reshape(shape), t.reshape(shape)
        elif key.endswith(("scale", "norm.weight")) or ".norm" in key and key.endswith(".weight"):
            w = torch.ones(shape)
            t = w + 0.001 * torch.randn(shape, generator=gen)
        else:
            w = 0.01 * torch.randn(shape, generator=gen)
            t = w + 0.0005 * torch.randn(shape, generator=gen)
        src.write(key, w)
        tgt.write(key, t)
        done += w.numel()
        del w, t
        if is_lora_weight(family, key, shape):
            m, n = shape
            name = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
            for j, lora in enumerate(loras.values()):
                g = torch.Generator().manual_seed(SEED * 7_919 + 2 * i + j + 1)
                lora[f"{name}.lora_down.weight"] = (torch.randn(LORA_RANK, n, generator=g) / math.sqrt(n)).to(torch.bfloat16)
                lora[f"{name}.lora_up.weight"] = (torch.randn(m, LORA_RANK, generator=g) * 0.01).to(torch.bfloat16)
                lora[f"{name}.alpha"] = torch.tensor(LORA_ALPHA)
        if (i + 1) % max(1, len(layout) // 20) == 0 or i + 1 == len(layout):
            log(f"generated {i + 1}/{len(layout)} tensors ({done / 1e9:.2f} G parameters, {time.perf_counter() - t0:.0f} s)")
    src.close()
    tgt.close()
    for name, tensors in loras.items():
        save_file(tensors, str(folder / f"{name}.safetensors"), metadata={"ss_network_dim": str(LORA_RANK), "ss_network_alpha": str(LORA_ALPHA)})
    mpath.write_text(json.dumps(manifest))
    return {"reused": False, "seconds": time.perf_counter() - t0}


def _status_kib(pid: int) -> dict[str, float]:
    """``VmHWM``, ``VmRSS`` and ``RssAnon`` of a live process, KiB (empty once it has exited)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {ln.split(":")[0]: float(ln.split()[1]) for ln in lines if ln.startswith(("VmHWM:", "VmRSS:", "RssAnon:"))}


def _bases_written(cache: Path) -> list[tuple[float, int]]:
    """(write time, m·n) of every basis in the cache, oldest first (``m``, ``n`` from its U and V shapes)."""
    out = []
    for f in cache.rglob("*.safetensors"):
        try:
            with open(f, "rb") as fh:
                header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
            out.append((f.stat().st_mtime, header["U"]["shape"][0] * header["V"]["shape"][0]))
        except (OSError, ValueError, KeyError):
            continue  # being written
    return sorted(out)


def run_engine(args: dict, work: Path, name: str, time_limit: float | None) -> dict:
    """``bench.phases engine`` in a fresh process (its log streamed to ``<work>/<name>.log``), watched
    from here every second: peak ``VmHWM`` / ``RssAnon`` from ``/proc`` and the bases written to the
    cache. Past ``time_limit`` seconds the process is stopped and the partial figures are returned
    (``completed: False``: the bases computed, the time to the first one, the longest gap between two)."""
    args = dict(args, work=str(work), result=str(work / f"{name}.json"))
    argfile = work / f"{name}.args.json"
    argfile.write_text(json.dumps(args))
    env = dict(os.environ, OMP_NUM_THREADS=str(args["threads"]), MKL_NUM_THREADS=str(args["threads"]))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cache = Path(args["cache"])
    before = {t for t, _ in _bases_written(cache)} if cache.exists() else set()
    peak = {"VmHWM": 0.0, "RssAnon": 0.0, "VmRSS": 0.0}
    t0 = time.time()
    with open(work / f"{name}.log", "w") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "bench.phases", "engine", "--args", str(argfile)], cwd=ROOT, env=env,
                                stdout=logf, stderr=subprocess.STDOUT)
        stopped = False
        while proc.poll() is None:
            for k, v in _status_kib(proc.pid).items():
                peak[k] = max(peak[k], v)
            if time_limit is not None and time.time() - t0 > time_limit:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                stopped = True
                break
            time.sleep(1.0)
    seconds = time.time() - t0
    new = [(t, e) for t, e in _bases_written(cache) if t not in before] if cache.exists() else []
    times = [t0] + [t for t, _ in new]
    watched = {"watched_peak_hwm_mib": peak["VmHWM"] / 1024, "watched_peak_anon_mib": peak["RssAnon"] / 1024, "bases_written": len(new),
               "elements_written": sum(e for _, e in new), "first_basis_s": (new[0][0] - t0) if new else None,
               "longest_gap_between_bases_s": max((b - a for a, b in zip(times[1:], times[2:])), default=0.0),
               "last_basis_s": (new[-1][0] - t0) if new else None}
    if stopped or proc.returncode != 0:
        if not stopped:
            sys.stderr.write((work / f"{name}.log").read_text()[-4000:])
            raise SystemExit(f"phase {name} failed with exit code {proc.returncode} (log: {work / f'{name}.log'})")
        log(f"{name}: stopped at the time limit ({time_limit:.0f} s)")
        return {"completed": False, "seconds": seconds, **watched}
    res = json.loads((work / f"{name}.json").read_text())
    return {"completed": True, **res, **watched, "wall_with_startup": seconds}


def gib(path: Path) -> float:
    return path.stat().st_size / 2**30


def render(res: dict, opts: argparse.Namespace) -> str:
    label = {"flux-dev": "Flux-dev", "wan-14b": "Wan 2.1 14B"}[opts.family]
    cmd = f"nice -n 10 .venv/bin/python -m bench.bench_flux_full --family {opts.family}" + (f" --blocks {opts.blocks}" if opts.blocks else "")
    lines = [f"## A whole {label}-size transfer through the CLI (`{cmd}`)", "",
             f"{platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs (1-min load average {res['load'][0]:.1f} at the start, "
             f"{res['load'][1]:.1f} at the end), {res['ram_gib']:.0f} GiB RAM; torch {res['torch']}; CLI `transfer --threads {opts.threads}` "
             f"under `nice -n 10`, engine defaults (`prolora-full`, threshold 0.8, randomized bases, k = min(64, d // 4)).", "",
             f"- Layout: {res['tensors']} tensors ({res['params'] / 1e9:.2f} B parameters) of ComfyUI's own class on the meta device"
             + (f", the first {opts.blocks} blocks of each kind" if opts.blocks else "") + "; detected by the CLI as "
             f"`{res['cold'].get('detected', '(run stopped before its report)')}`.",
             f"- Source {res['files']['source']:.2f} GiB ({opts.source_dtype}), target {res['files']['target']:.2f} GiB (fp8 e4m3fn weights), "
             f"LoRAs {res['files']['lora_a']:.3f} GiB each (rank {LORA_RANK}, kohya names, bf16) on {res['bases_total'] // 2} block weights; "
             f"generated in {fmt_s(res['generate']['seconds'])} s" + (" (re-used)" if res["generate"]["reused"] else "") + ".",
             f"- RAM {res['ram_gib']:.0f} GiB against {res['files']['source'] + res['files']['target']:.1f} GiB of bases: "
             "the OS page cache cannot hold "
             "both files, so each run reads them from disk." if res["files"]["source"] + res["files"]["target"] > res["ram_gib"] * 0.8 else
             "- The bases fit in the OS page cache (the warm run reads them from memory).", "",
             "| run | wall s | bases computed / from cache | modules transferred | peak own (anonymous) MiB | "
             "peak RSS MiB (incl. mapped file pages) | "
             "longest progress silence s | after the last progress line s | Φ (U, V) lowest |", "|---|---|---|---|---|---|---|---|---|"]
    partial = []
    for run in ("cold", "warm"):
        r = res.get(run)
        if r is None:
            lines.append(f"| {run} | not run (the cold run did not finish) | | | | | | | |")
            continue
        if not r["completed"]:
            lines.append(f"| {run} | stopped at {fmt_s(r['seconds'])} (time limit) | {r['bases_written']} of {res['bases_total']} computed | — | "
                         f"**{r['watched_peak_anon_mib']:.0f}** | {r['watched_peak_hwm_mib']:.0f} | {r['longest_gap_between_bases_s']:.1f} "
                         "(between two bases written) | — | — |")
            partial.append((run, r))
            continue
        lo = min(min(v) for v in r["phi"].values()) if r["phi"] else float("nan")
        lines.append(f"| {run} | **{fmt_s(r['seconds'])}** | {r['svd_computed']} / {r['bases_from_cache']} | {r['transferred']}/{r['modules']} | "
                     f"**{max(r['peak_anon_mib'], r['watched_peak_anon_mib']):.0f}** | {max(r['peak_rss_mib'], r['watched_peak_hwm_mib']):.0f} | "
                     f"{r['silence']:.1f} | {r['tail']:.1f} | {lo:.4f} |")
    for run, r in partial:
        if r["bases_written"] >= 2:
            busy = r["last_basis_s"] - r["first_basis_s"]
            rate = r["elements_written"] / max(busy, 1e-9)  # entries of weights whose bases were written, per second
            rest = (res["elements_total"] - r["elements_written"]) / rate
            lines += ["", f"- {run}: both files hashed and the first basis written after {fmt_s(r['first_basis_s'])} s; then "
                      f"{r['bases_written']} bases ({r['elements_written'] / 1e9:.2f} G of {res['elements_total'] / 1e9:.2f} G weight entries) in "
                      f"{fmt_s(busy)} s, {rate / 1e6:.1f} M entries/s: the whole {run} run at that rate ≈ **{fmt_s(r['last_basis_s'] + rest)} s** "
                      "(extrapolated from this run's own rate, not measured to the end)."]
    lines += ["", f"Cache after the cold run: {res['cache_mib']:.0f} MiB. Total wall time of the benchmark {fmt_s(res['seconds'])} s. "
              "Peak memory: the larger of the phase's own 10 ms sampler and this script's 1 s reading of `/proc/<pid>/status` "
              "(`RssAnon`, `VmHWM`).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_flux_full", description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=("flux-dev", "wan-14b"), default="flux-dev")
    ap.add_argument("--blocks", type=int, default=None, help="only the first N blocks of each kind (a cut-down try)")
    ap.add_argument("--source-dtype", choices=("bfloat16", "float16"), default=None, help="default bf16 for Flux, fp16 for Wan (their releases)")
    ap.add_argument("--threads", type=int, default=2, help="the CLI's --threads (default 2)")
    ap.add_argument("--data-dir", default=os.environ.get("PROLORA_BENCH_DIR", "/tmp/prolora-bench") + "/full")
    ap.add_argument("--out", default=None, help="markdown output (default bench/results-flux-full.md or -wan-full.md)")
    ap.add_argument("--keep", action="store_true", help="keep the generated data (default: deleted at the end)")
    ap.add_argument("--time-limit", type=float, default=None, help="stop a transfer after this many seconds and report how far it got "
                    "(the bases computed, memory, the rate: on a loaded machine the cold run may not finish)")
    ap.add_argument("--render-only", action="store_true")
    opts = ap.parse_args(argv)
    opts.source_dtype = opts.source_dtype or ("bfloat16" if opts.family == "flux-dev" else "float16")
    folder = Path(opts.data_dir)
    work = folder / "run"
    result_path = folder.parent / f"{folder.name}-result.json"
    if opts.render_only:
        res = json.loads(result_path.read_text())
    else:
        import psutil
        import torch

        torch.set_num_threads(opts.threads)
        t0 = time.perf_counter()
        layout = full_layout(opts.family, opts.blocks)
        need = sum(math.prod(s) for _, s in layout) * (2 + 1) / 2**30
        free = shutil.disk_usage(folder.parent if folder.parent.exists() else "/").free / 2**30
        log(f"{opts.family}: {len(layout)} tensors, {sum(math.prod(s) for _, s in layout) / 1e9:.2f} B parameters; "
            f"≈ {need:.1f} GiB to write (unless re-used), {free:.1f} GiB free")
        res = {"torch": torch.__version__, "ram_gib": psutil.virtual_memory().total / 2**30, "tensors": len(layout),
               "params": sum(math.prod(s) for _, s in layout), "load": [os.getloadavg()[0]]}
        res["generate"] = generate(folder, opts.family, layout, opts.source_dtype)
        res["files"] = {f: gib(folder / f"{f}.safetensors") for f in ("source", "target", "lora_a", "lora_b")}
        work.mkdir(parents=True, exist_ok=True)
        cache = work / "cache"
        shutil.rmtree(cache, ignore_errors=True)  # cold: an empty cache
        lora_shapes = [s for k, s in layout if is_lora_weight(opts.family, k, s)]
        res["bases_total"], res["elements_total"] = 2 * len(lora_shapes), 2 * sum(math.prod(s) for s in lora_shapes)
        for run, lora in (("cold", "lora_a"), ("warm", "lora_b")):
            r = run_engine({"folder": str(folder), "device": "cpu", "mode": "prolora-full", "threads": opts.threads, "cli_threads": opts.threads,
                            "cache": str(cache), "threshold": 0.8, "lora": f"{lora}.safetensors", "out": str(work / f"{run}.safetensors"),
                            "report": str(work / f"{run}-report.json")}, work, run, opts.time_limit)
            res[run] = r
            if run == "cold":
                res["cache_mib"] = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 2**20
            if not r["completed"]:
                log(f"{run}: stopped after {fmt_s(r['seconds'])} s with {r['bases_written']}/{res['bases_total']} bases; peak own "
                    f"{r['watched_peak_anon_mib']:.0f} MiB, VmHWM {r['watched_peak_hwm_mib']:.0f} MiB")
                break  # a warm run needs the whole cache of the cold one
            r["detected"] = json.loads((work / f"{run}-report.json").read_text())["summary"].get("key_map", "?")
            r.pop("pairs", None)
            log(f"{run}: {fmt_s(r['seconds'])} s, {r['transferred']}/{r['modules']} transferred, bases {r['svd_computed']} computed / "
                f"{r['bases_from_cache']} cached, peak own {r['peak_anon_mib']:.0f} MiB, RSS {r['peak_rss_mib']:.0f} MiB, "
                f"silence {r['silence']:.1f} s")
        res["load"].append(os.getloadavg()[0])
        res["seconds"] = time.perf_counter() - t0
        result_path.write_text(json.dumps(res, indent=1))
        if not opts.keep:
            shutil.rmtree(folder, ignore_errors=True)
            log(f"deleted {folder}")
    text = render(res, opts)
    out = Path(opts.out or f"bench/results-{'flux' if opts.family == 'flux-dev' else 'wan'}-full.md")
    out.write_text(text + "\n")
    print(text, flush=True)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
