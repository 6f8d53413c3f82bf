"""A library of LoRAs in batch: LoRAs per minute, warm, against one pair of bases.

Run from the repository root::

    .venv/bin/python -m bench.bench_library --scale ci                    # < 1 min on 2 CPU cores
    nice -n 10 .venv/bin/python -m bench.bench_library --scale sdxl       # 24 LoRAs on SDXL's 722 modules

Data (generated once into ``--data-dir``, default ``$PROLORA_BENCH_DIR`` or ``/tmp/prolora-bench``,
re-used while the manifest matches; not timed): the source and target bases of ``bench/synth.py``
(SDXL's real transformer key layout, ``gapped`` spectrum, fp16) and ``--loras`` LoRAs on every
module, kohya underscore names (``lora_unet_<module>``), fp16, ranks alternating over ``--ranks``.

Timed, in ONE run on the SAME files (bases in the OS page cache, cache filled first by an untimed
run with ``lora_a``, so every run is warm: ``svd_computed == 0``):

(a) **one process** over the whole folder: ``python -m prolora_core transfer --lora-dir …``;
(b) **separate processes**, one ``python -m prolora_core transfer --lora <one file>`` per LoRA
    (``--separate`` of them, default 3, the rest extrapolated per LoRA and marked so).

Each run is the CLI's own code path (``prolora_core.cli.main``) in a fresh interpreter
(``bench.bench_library --child``), which times, without changing them, the engine's phases:
reading LoRAs (``read_lora``), bases from the cache and Φ (``match_modules``), projection
(``project_loras``), writing (``atomic_save``), and the rest of ``main`` (opening the bases,
placing, checks, summaries). Imports are timed in the child; process start is the parent's wall
clock minus everything the child timed. The child also records the longest silence on stdout and
stderr (what a user watching the CLI sees). Modules are placed by weight names (``--key-map
names``): the synthetic bases are not whole checkpoints ComfyUI could detect, and importing
ComfyUI would add its own start-up to every process of (b).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

T_START = time.perf_counter()
ROOT = Path(__file__).resolve().parent.parent
GOAL = 60.0  # LoRAs per minute, warm, at SDXL scale on 2 cores
PHASES = ("imports", "read LoRA", "bases from cache + Φ", "projection", "write", "other (open, place, check, report)", "process start")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- data
def library_manifest(scale: str, n: int, ranks: list[int], seed: int) -> dict:
    return {"format": 1, "scale": scale, "loras": n, "ranks": ranks, "seed": seed, "dtype": "float16", "layout": "kohya"}


def write_library(folder: Path, modules: list, n: int, ranks: list[int], seed: int) -> list[Path]:
    """``n`` kohya-named fp16 LoRAs on every module (``lora_unet_<module with _>``), rank ``ranks[i % len(ranks)]``,
    alpha = rank / 2."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        r = ranks[i % len(ranks)]
        g = torch.Generator().manual_seed(seed * 1_000 + i)
        tensors: dict[str, torch.Tensor] = {}
        for mod in modules:
            m, k = mod.shape
            name = "lora_unet_" + mod.name.replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = (torch.randn(r, k, generator=g) / math.sqrt(k)).half()
            tensors[f"{name}.lora_up.weight"] = (torch.randn(m, r, generator=g) * 0.01).half()
            tensors[f"{name}.alpha"] = torch.tensor(r / 2, dtype=torch.float16)
        path = folder / f"style_{i:03d}_r{r}.safetensors"
        save_file(tensors, str(path), metadata={"ss_network_dim": str(r), "ss_network_alpha": str(r / 2)})
        paths.append(path)
    return paths


def prepare(opts: argparse.Namespace) -> tuple[Path, list[Path]]:
    import torch

    from . import synth
    from .shapes import modules_for

    modules = modules_for(opts.scale)
    data = Path(opts.data_dir) / f"{opts.scale}-gapped-float16-rho0.005-s0"  # bench_transfer's folder for the same data
    manifest = synth.manifest_for(opts.scale, "gapped", modules, torch.float16, 0.005, 0)
    if not synth.is_generated(data, manifest):
        log(f"generating {opts.scale} bases ({len(modules)} modules) in {data}")
        synth.generate(data, manifest, modules, torch.device("cpu"), log=log)
    lib = data / f"library-{opts.loras}"
    want = library_manifest(opts.scale, opts.loras, opts.ranks, 0)
    try:
        have = json.loads((lib / "manifest.json").read_text())
    except (OSError, ValueError):
        have = None
    paths = sorted(lib.glob("*.safetensors"))
    if have != want or len(paths) != opts.loras:
        log(f"writing {opts.loras} LoRAs (ranks {opts.ranks}) in {lib}")
        shutil.rmtree(lib, ignore_errors=True)
        paths = write_library(lib, modules, opts.loras, opts.ranks, 0)
        (lib / "manifest.json").write_text(json.dumps(want))
    return data, paths


# ---------------------------------------------------------------- one CLI process, timed from inside
class _Stamped:
    """A text stream that remembers when it was last written to (the longest silence a user sees)."""

    def __init__(self, inner, clock: list[float], gaps: list[float]) -> None:
        self.inner, self.clock, self.gaps = inner, clock, gaps

    def write(self, s: str) -> int:
        now = time.perf_counter()
        self.gaps.append(now - self.clock[0])
        self.clock[0] = now
        return self.inner.write(s)

    def flush(self) -> None:
        self.inner.flush()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def child(argv: list[str], result: Path) -> None:
    """Run ``prolora_core.cli.main(argv)`` with timers around the engine's phases; write them to ``result``."""
    import torch  # noqa: F401  (imports are timed)

    from prolora_core import cli, file_transfer

    transfer = sys.modules["prolora_core.transfer"]  # the package re-exports the function under the module's name

    imports = time.perf_counter() - T_START
    spent = dict.fromkeys(("read LoRA", "bases from cache + Φ", "projection", "write"), 0.0)

    def timed(module, name: str, phase: str) -> None:
        inner = getattr(module, name)

        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                spent[phase] += time.perf_counter() - t

        setattr(module, name, wrapper)

    timed(file_transfer, "read_lora", "read LoRA")
    timed(transfer, "match_modules", "bases from cache + Φ")
    timed(transfer, "project_loras", "projection")
    timed(file_transfer, "atomic_save", "write")
    clock, gaps = [time.perf_counter()], []
    sys.stdout, sys.stderr = _Stamped(sys.stdout, clock, gaps), _Stamped(sys.stderr, clock, gaps)
    t0 = time.perf_counter()
    rc = cli.main(argv)
    run = time.perf_counter() - t0
    gaps.append(time.perf_counter() - clock[0])
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    spent["other (open, place, check, report)"] = run - sum(spent.values())
    spent["imports"] = imports
    result.write_text(json.dumps({"rc": rc, "seconds": spent, "in_process": imports + run, "silence": max(gaps)}))


def run_cli(args: list[str], work: Path, name: str, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    result = work / f"{name}.json"
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-m", "bench.bench_library", "--child", str(result), "--", *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    (work / f"{name}.log").write_text(proc.stdout)
    if proc.returncode != 0 or not result.exists():
        sys.stderr.write(proc.stdout[-4000:])
        raise SystemExit(f"{name} failed with exit code {proc.returncode} (log: {work / f'{name}.log'})")
    res = json.loads(result.read_text())
    if res["rc"] != 0:
        sys.stderr.write(proc.stdout[-4000:])
        raise SystemExit(f"{name}: the CLI exited with {res['rc']}")
    res["wall"] = wall
    res["cpu"] = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)  # the child's CPU seconds, all threads
    res["seconds"]["process start"] = max(0.0, wall - res["in_process"])
    res["log"] = proc.stdout
    return res


def cli_args(data: Path, cache: Path, threads: int, loras: list[str], out_dir: Path, report: Path | None = None,
             mode: str = "prolora-full") -> list[str]:
    args = ["transfer", "--source-base", str(data / "source.safetensors"), "--target-base", str(data / "target.safetensors"),
            "--out-dir", str(out_dir), "--cache-dir", str(cache), "--key-map", "names", "--threads", str(threads), "--device", "cpu",
            "--mode", mode]
    for item in loras:
        args += item.split(" ", 1) if item.startswith("--") else ["--lora", item]
    return args + (["--report", str(report)] if report is not None else [])


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child(sys.argv[4:], Path(sys.argv[2]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=("ci", "sdxl"), default="ci")
    ap.add_argument("--loras", type=int, default=None, help="LoRAs in the library (default 8 at ci, 24 at sdxl)")
    ap.add_argument("--ranks", type=lambda s: [int(x) for x in s.split(",")], default=[16, 32])
    ap.add_argument("--separate", type=int, default=None, help="how many of the separate processes (b) to run, the rest extrapolated (default 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads of the CLI (default 2: the goal's 2 cores)")
    ap.add_argument("--data-dir", default=os.environ.get("PROLORA_BENCH_DIR", "/tmp/prolora-bench"))
    ap.add_argument("--mode", default="prolora-full", help="projection mode of every run (default prolora-full; the engine's default "
                    "auto picks casa on close targets, whose full SVDs dominate the time)")
    ap.add_argument("--keep", action="store_true", help="keep the outputs and the cache (default: removed after the run)")
    opts = ap.parse_args()
    opts.loras = opts.loras or (8 if opts.scale == "ci" else 24)
    separate = max(1, min(opts.loras, opts.separate if opts.separate is not None else 3))
    data, paths = prepare(opts)
    work = data / "library-run"
    shutil.rmtree(work, ignore_errors=True)
    cache, out_a, out_b = data / "library-cache", work / "out_one", work / "out_separate"  # the cache outlives a run (filled once)
    for d in (out_a, out_b):
        d.mkdir(parents=True)

    t = time.perf_counter()
    fill = run_cli(cli_args(data, cache, opts.threads, [str(data / "lora_a.safetensors")], work, mode=opts.mode), work, "fill", opts.threads)
    log(f"cache filled in {time.perf_counter() - t:.1f} s (untimed)")
    one = run_cli(cli_args(data, cache, opts.threads, [f"--lora-dir {paths[0].parent}"], out_a, work / "report_one.json", mode=opts.mode), work, "one", opts.threads)
    report = json.loads((work / "report_one.json").read_text())["summary"]
    if report["svd_computed"] != 0:
        raise SystemExit(f"the library run computed {report['svd_computed']} SVDs: the cache was not warm")
    written = len(list(out_a.glob("*.safetensors")))
    log(f"(a) one process: {len(paths)} LoRAs in {one['wall']:.1f} s, {written} written")
    shutil.rmtree(out_a, ignore_errors=True)  # disk: the outputs are as large as the library
    sep = []
    for i, p in enumerate(paths[:separate]):
        sep.append(run_cli(cli_args(data, cache, opts.threads, [str(p)], out_b, mode=opts.mode), work, f"separate_{i}", opts.threads))
        log(f"(b) separate process {i + 1}/{separate}: {sep[-1]['wall']:.1f} s")
    shutil.rmtree(out_b, ignore_errors=True)

    n = len(paths)
    per_b = sum(r["wall"] for r in sep) / len(sep)
    rate_a, rate_b = 60 * n / one["wall"], 60 / per_b
    extrap = "" if separate == n else f" (extrapolated from {separate} of {n})"
    lines = [f"### library of {n} LoRAs (ranks {opts.ranks}, fp16, kohya names) on `{opts.scale}` ({fill_modules(opts.scale)} modules), warm, "
             f"{opts.threads} CPU thread(s), load {os.getloadavg()[0]:.2f}", "",
             "| run | seconds | LoRAs/min | ratio | CPU s (all threads) | longest silence s |", "|---|---|---|---|---|---|",
             f"| (a) one process, `--lora-dir` | {one['wall']:.1f} | {rate_a:.1f} | {rate_a / rate_b:.1f}× | {one['cpu']:.1f} | {one['silence']:.1f} |",
             f"| (b) {n} separate processes{extrap} | {per_b * n:.1f} | {rate_b:.1f} | 1× | {n * sum(r['cpu'] for r in sep) / len(sep):.1f} "
             f"| {max(r['silence'] for r in sep):.1f} |",
             "", (f"goal ≥ {GOAL:g} LoRAs/min warm at SDXL scale: (a) {'met' if rate_a >= GOAL else 'NOT met'}; from CPU time alone "
                  f"({one['cpu']:.1f} CPU s on 2 cores) {60 * n / (one['cpu'] / 2):.0f} LoRAs/min" if opts.scale == "sdxl"
                  else f"(the goal, ≥ {GOAL:g} LoRAs/min, is for --scale sdxl)"), "",
             "where the time goes (seconds; (b) per process, mean):", "",
             "| phase | (a) whole run | (a) per LoRA | (b) per process |", "|---|---|---|---|"]
    for phase in PHASES:
        a = one["seconds"].get(phase, 0.0)
        b = sum(r["seconds"].get(phase, 0.0) for r in sep) / len(sep)
        lines.append(f"| {phase} | {a:.2f} | {a / n:.3f} | {b:.2f} |")
    lines.append(f"| total (wall) | {one['wall']:.2f} | {one['wall'] / n:.3f} | {per_b:.2f} |")
    print("\n".join(lines))
    if not opts.keep:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)


def fill_modules(scale: str) -> int:
    from .shapes import modules_for

    return len(modules_for(scale))


if __name__ == "__main__":
    main()
