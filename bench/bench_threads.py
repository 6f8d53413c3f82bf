"""A transfer beside a running sampler: does the thread default leave sampling its share?

Not a test: nothing here asserts on timings. Run from the repository root:

    .venv/bin/python -m bench.bench_threads [--scale ci] [--threads default,all] [--sampler-threads all]

For each transfer thread count (``default`` = ``prolora_core.config.default_threads()``: half the
cores, at most 4; ``all`` = every core, torch's own choice), four timings on the SAME files:

- **transfer alone**: ``python -m prolora_core transfer … --no-cache --threads T`` (a cold run: every
  basis computed), in a fresh process, wall time;
- **sampler alone**: a stand-in for a CPU KSampler in another process (3×3 convolutions and
  attention-sized matmuls on a 64×64 latent with 320 channels, torch's default threads, like
  ComfyUI), steps per second over the same wall time;
- **both at once**: the sampler running, then the same transfer; the transfer's time and the
  sampler's steps per second over the transfer's window.

Printed: each time and the ratios beside/alone (transfer slowdown, sampler throughput kept). The
data are bench/synth.py's SDXL-shaped weights (generated once under ``--data-dir``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sampler(seconds: float, out: Path, threads: int | None) -> None:
    """Run sampling-like steps for ``seconds``, appending ``time steps`` lines to ``out`` every step."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    x = torch.randn(1, 320, 64, 64)
    conv = torch.nn.Conv2d(320, 320, 3, padding=1)
    q = torch.randn(4096, 320)
    w = torch.randn(320, 320)
    steps, t_end = 0, time.perf_counter() + seconds
    with torch.no_grad(), open(out, "w") as fh:
        while time.perf_counter() < t_end:
            y = conv(x)
            a = torch.softmax((q @ w) @ q[:1024].T / 18.0, dim=-1) @ q[:1024]
            x = 0.5 * x + 0.5 * torch.tanh(y) + 0.0 * a.mean()
            steps += 1
            fh.write(f"{time.time():.6f} {steps}\n")
            fh.flush()


def rate(log: Path, t0: float, t1: float) -> float:
    """Sampler steps per second between wall times ``t0`` and ``t1`` (from its log)."""
    rows = [tuple(map(float, line.split())) for line in log.read_text().splitlines() if line.strip()]
    inside = [(t, s) for t, s in rows if t0 <= t <= t1]
    if len(inside) < 2:
        return float("nan")
    return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


def transfer(data: Path, threads: int, out: Path) -> float:
    argv = [sys.executable, "-m", "prolora_core", "transfer", "--source-base", str(data / "source.safetensors"), "--target-base",
            str(data / "target.safetensors"), "--lora", str(data / "lora_a.safetensors"), "--out", str(out), "--no-cache", "--device", "cpu",
            "--threshold", "0", "--threads", str(threads)]
    t0 = time.perf_counter()
    subprocess.run(argv, cwd=REPO, check=True, capture_output=True, text=True)
    return time.perf_counter() - t0


def start_sampler(log: Path, seconds: float, threads: int | None) -> subprocess.Popen:
    argv = [sys.executable, "-m", "bench.bench_threads", "--run-sampler", str(seconds), "--sampler-log", str(log)]
    if threads:
        argv += ["--sampler-threads", str(threads)]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return subprocess.Popen(argv, cwd=REPO, env=env)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", default="ci", choices=("ci", "sdxl"))
    ap.add_argument("--threads", default="default,all", help="comma-separated transfer thread counts: default, all, or numbers")
    ap.add_argument("--sampler-threads", type=int, default=None, help="the sampler's torch threads (default: torch's own, every core)")
    ap.add_argument("--data-dir", default=os.environ.get("PROLORA_BENCH_DIR", "/tmp/prolora-bench"))
    ap.add_argument("--run-sampler", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--sampler-log", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.run_sampler is not None:
        sampler(args.run_sampler, Path(args.sampler_log), args.sampler_threads)
        return 0

    import torch

    from prolora_core.config import default_threads

    from .shapes import modules_for
    from .synth import generate, is_generated, manifest_for

    mods = modules_for(args.scale)
    data = Path(args.data_dir) / f"threads-{args.scale}"
    manifest = manifest_for(args.scale, "gapped", mods, torch.float16, 0.005, 0)
    if not is_generated(data, manifest):
        print(f"generating {len(mods)} SDXL-shaped modules in {data} …", flush=True)
        generate(data, manifest, mods, torch.device("cpu"), log=lambda *a: None)
    cores = os.cpu_count() or 1
    counts = [default_threads() if t == "default" else cores if t == "all" else int(t) for t in args.threads.split(",")]
    work = data / "run"
    work.mkdir(exist_ok=True)
    rows = []
    for threads in counts:
        alone = transfer(data, threads, work / "out.safetensors")
        log = work / "sampler.log"
        p = start_sampler(log, alone + 4.0, args.sampler_threads)
        time.sleep(1.5)
        t0 = time.time()
        time.sleep(alone)
        s_alone = rate(log, t0, time.time())
        p.wait()
        p = start_sampler(log, 10 * alone + 30.0, args.sampler_threads)
        time.sleep(1.5)
        t0 = time.time()
        beside = transfer(data, threads, work / "out.safetensors")
        s_beside = rate(log, t0, time.time())
        p.terminate()
        p.wait()
        rows.append({"threads": threads, "transfer_alone_s": alone, "transfer_beside_s": beside, "sampler_alone_steps_s": s_alone,
                     "sampler_beside_steps_s": s_beside})
    print(f"\n{len(mods)} modules ({args.scale}), {cores} cores, sampler threads {args.sampler_threads or torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| transfer threads | transfer alone | beside sampler | slowdown | sampler alone | beside transfer | sampler keeps |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['threads']} | {r['transfer_alone_s']:.1f} s | {r['transfer_beside_s']:.1f} s | {r['transfer_beside_s'] / r['transfer_alone_s']:.2f}× | "
              f"{r['sampler_alone_steps_s']:.2f} steps/s | {r['sampler_beside_steps_s']:.2f} steps/s | "
              f"{r['sampler_beside_steps_s'] / r['sampler_alone_steps_s']:.0%} |")
    (work / "result.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
