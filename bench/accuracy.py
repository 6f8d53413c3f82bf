"""How accurate the randomized bases are, which algorithm and stopping rule get there cheapest, and
how much holding the bases in half precision costs (issue 13, items 3 and 4).

Part ``basis`` (one SDXL shape, 1280 × 1280 and 10240 × 1280 by default, k = the engine's default, the
target a 0.5 % perturbation of the source, a random rank-8 LoRA, weights stored in fp16 as the
benchmark stores them), side by side on a gapped and a power-law spectrum (bench/synth.py):

* **subspace iteration** (Halko, Martinsson & Tropp 2011, Alg. 4.4; the engine's algorithm up to
  ``ALGORITHM_VERSION`` 2, restated here in :func:`subspace_iteration`) with oversampling 16, 48, 64
  and its old stopping test ``1 − Φ(previous, current) ≤ 1e-5``;
* **block Krylov** (the engine's ``randomized`` method now; Musco & Musco 2015) with oversampling 16
  and 32 and the stopping test "estimated sin θ_max to the exact subspace ≤ tol" for several tol.

For each: steps, seconds (both bases), the relative Frobenius error of the projected update (Eq. 3)
against the exact-basis projection (float64 full SVD of the same weights), the true largest
principal-angle sine to the exact subspace, and the reported ``Basis.uncertainty``.

Part ``cache`` (the SDXL shapes of ``--scale ci``, both spectra): the engine's bases with ``U``, ``V``
held in float32, float16 and bfloat16 (``BasisSettings.cache_dtype``): error of the projected update
against the float32-basis projection and against the exact one, the fp16 weight floor (exact bases
of the fp32 weights vs of their fp16 copies), and the cache's size and warm read time.

    .venv/bin/python -m bench.accuracy > bench/results-accuracy.md     # ~3 min on 2 CPU cores
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from prolora_core.basis import CACHE_DTYPES, Basis, BasisSettings, compute_basis, compute_bases, default_rank
from prolora_core.cache import BasisCache

from .phases import factored_transfer
from .shapes import ci_modules
from .synth import source_weight


def sin_max(exact: torch.Tensor, B: torch.Tensor) -> float:
    """Largest principal-angle sine between span(exact) and span(B) (float64)."""
    B = torch.linalg.qr(B.double())[0]
    return float(torch.linalg.matrix_norm(B - exact @ (exact.T @ B), ord=2))


def subspace_iteration(w: torch.Tensor, k: int, p: int, tol: float = 1e-5, max_iter: int = 24, seed: int = 0) -> tuple[Basis, int]:
    """The engine's randomized basis up to ALGORITHM_VERSION 2, for comparison: Halko et al. Alg. 4.4
    with QR at every half step, stopping once ``1 − Φ(previous, current) ≤ tol`` (at least 2 steps)."""
    A = w.float()
    m, n = A.shape
    l = min(k + p, min(m, n))
    omega = torch.randn(n, l, generator=torch.Generator().manual_seed(seed))
    Q, _ = torch.linalg.qr(A @ omega)
    prev = None
    it = 0
    for it in range(1, max_iter + 1):
        Qn, _ = torch.linalg.qr(A.T @ Q)
        Q, Rr = torch.linalg.qr(A @ Qn)
        cur = Q @ torch.linalg.svd(Rr)[0][:, :k]
        if prev is not None and 1.0 - float((prev.T @ cur).square().sum()) / k <= tol:
            break
        prev = cur
    Ub, S, Vh = torch.linalg.svd(Q.T @ A, full_matrices=False)
    return Basis(Q @ Ub[:, :k], S[:k], Vh[:k].T, (m, n), "subspace-iteration", it), it


def pair(spectrum: str, m: int, n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source and target weights as the benchmark makes them (fp32 values of the fp16-stored weights),
    and a random rank-8 LoRA ``B``, ``A`` (float64)."""
    gen = torch.Generator().manual_seed(seed)
    ws, s1 = source_weight(spectrum, m, n, gen, torch.device("cpu"))
    wt = ws + 0.005 * s1 / (math.sqrt(m) + math.sqrt(n)) * torch.randn(m, n, generator=gen)
    B, A = torch.randn(m, 8, generator=gen, dtype=torch.float64), torch.randn(8, n, generator=gen, dtype=torch.float64)
    return ws, wt, B, A


def exact(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    U, _, Vh = torch.linalg.svd(w.double(), full_matrices=False)
    return U[:, :k], Vh[:k].T


def update(B: torch.Tensor, A: torch.Tensor, bs: tuple[torch.Tensor, torch.Tensor], bt: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    up, down = factored_transfer(B, A, 1.0, bs[0].double(), bs[1].double(), bt[0].double(), bt[1].double(), "prolora")
    return up @ down


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.norm(x - ref) / torch.linalg.norm(ref))


def part_basis(shapes: list[tuple[int, int]], tols: list[float]) -> list[str]:
    lines = ["| shape | spectrum | algorithm | stopping rule | steps (source/target) | seconds (2 bases) | rel. error of the projected update | "
             "true sin θ_max to exact | reported uncertainty |", "|---|---|---|---|---|---|---|---|---|"]
    for m, n in shapes:
        k = default_rank(m, n)
        for spectrum in ("gapped", "powerlaw"):
            ws, wt, B, A = pair(spectrum, m, n)
            ws, wt = ws.half().float(), wt.half().float()
            ex = {"s": exact(ws, k), "t": exact(wt, k)}
            ref = update(B, A, ex["s"], ex["t"])

            def row(algo: str, rule: str, fn: Callable[[torch.Tensor], tuple[Basis, int]]) -> None:
                t0 = time.perf_counter()
                (bs, its), (bt, itt) = fn(ws), fn(wt)
                sec = time.perf_counter() - t0
                err = rel(update(B, A, (bs.U, bs.V), (bt.U, bt.V)), ref)
                true = max(sin_max(ex["s"][0], bs.U), sin_max(ex["t"][0], bt.U))
                rep = "—" if bs.method != "randomized" else f"{max(bs.uncertainty, bt.uncertainty):.1e}"
                lines.append(f"| {m}×{n} | {spectrum} | {algo} | {rule} | {its}/{itt} | {sec:.2f} | {err:.1e} | {true:.1e} | {rep} |")

            for p in (16, 48, 64):
                row(f"subspace iteration, p = {p}", "1−Φ(prev, cur) ≤ 1e-5" + (" (before)" if p == 16 else ""),
                    lambda w, p=p: subspace_iteration(w, k, p))
            for p in (16, 32):
                for tol in tols:
                    s = BasisSettings(method="randomized", oversample=p, tol=tol)
                    default = p == BasisSettings().oversample and tol == BasisSettings().tol
                    row(f"block Krylov, p = {p}", f"estimated sin θ_max ≤ {tol:g}" + (" (now, default)" if default else ""),
                        lambda w, s=s: (lambda b: (b, b.iterations))(compute_basis(w, k, s)))
    return lines


def part_cache(reps: int) -> list[str]:
    shapes = sorted({tuple(mod.shape) for mod in ci_modules()})
    dtypes = list(CACHE_DTYPES.items())
    rows: list[str] = ["| spectrum | shape | k | fp16 weight floor | " + " | ".join(f"{name}: vs float32 bases / vs exact" for name, _ in dtypes) + " |",
                       "|---|---|---|---|" + "---|" * len(dtypes)]
    worst = {name: [0.0, 0.0] for name, _ in dtypes}
    floor_worst = 0.0
    bases: list[tuple[str, Basis]] = []
    for spectrum in ("gapped", "powerlaw"):
        for m, n in shapes:
            k = default_rank(m, n)
            w32s, w32t, B, A = pair(spectrum, m, n, seed=m + 7 * n)
            ws, wt = w32s.half().float(), w32t.half().float()
            ex = update(B, A, exact(ws, k), exact(wt, k))
            floor = rel(update(B, A, exact(w32s, k), exact(w32t, k)), ex)
            floor_worst = max(floor_worst, floor)
            fresh = {name: compute_bases([ws], k, BasisSettings(cache_dtype=dt))[0] for name, dt in dtypes}
            fresh_t = {name: compute_bases([wt], k, BasisSettings(cache_dtype=dt))[0] for name, dt in dtypes}
            base = update(B, A, (fresh["float32"].U, fresh["float32"].V), (fresh_t["float32"].U, fresh_t["float32"].V))
            cells = []
            for name, _ in dtypes:
                got = update(B, A, (fresh[name].U, fresh[name].V), (fresh_t[name].U, fresh_t[name].V))
                e32, eex = rel(got, base), rel(got, ex)
                worst[name] = [max(worst[name][0], e32), max(worst[name][1], eex)]
                cells.append(f"{e32:.1e} / {eex:.1e}")
            rows.append(f"| {spectrum} | {m}×{n} | {k} | {floor:.1e} | " + " | ".join(cells) + " |")
            bases += [(f"{spectrum}-{m}x{n}-{side}", b) for side, b in (("s", fresh["float32"]), ("t", fresh_t["float32"]))]
    rows.append(f"| **worst** | | | {floor_worst:.1e} | " + " | ".join(f"**{w[0]:.1e} / {w[1]:.1e}**" for w in worst.values()) + " |")
    # size and warm read time of a cache holding these bases, per dtype
    sizes, reads = {}, {}
    with tempfile.TemporaryDirectory(prefix="prolora-acc-") as tmp:
        for name, dt in dtypes:
            cache = BasisCache(Path(tmp) / name, BasisSettings(cache_dtype=dt))
            for key, b in bases:
                cache.store(f"{key:0>32}", b)
            sizes[name] = cache.size_bytes()
            best = math.inf
            for _ in range(reps):
                t0 = time.perf_counter()
                for key, b in bases:
                    assert cache.load(f"{key:0>32}", b.k, b.shape) is not None
                best = min(best, time.perf_counter() - t0)
            reads[name] = best
    rows += ["", f"Cache of these {len(bases)} bases (best of {reps} warm reads, files in the OS page cache):", "",
             "| cache dtype | size MiB | size vs float32 | warm read s | read vs float32 |", "|---|---|---|---|---|"]
    for name, _ in dtypes:
        rows.append(f"| {name} | {sizes[name] / 2**20:.1f} | {sizes[name] / sizes['float32']:.2f}× | {reads[name]:.3f} | {reads[name] / reads['float32']:.2f}× |")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("basis", "cache", "both"), default="both")
    ap.add_argument("--shapes", default="1280x1280,10240x1280", help="part basis: comma list of m x n")
    ap.add_argument("--tol", type=float, nargs="+", default=[1e-2, 3e-3, 1e-3, 1e-4], help="part basis: block Krylov tolerances")
    ap.add_argument("--reps", type=int, default=5, help="part cache: warm reads timed (best kept)")
    ap.add_argument("--threads", type=int, default=1)
    opts = ap.parse_args(argv)
    torch.set_num_threads(opts.threads)
    if opts.part in ("basis", "both"):
        shapes = [tuple(int(x) for x in s.split("x")) for s in opts.shapes.split(",")]
        print("### Randomized bases: algorithm and stopping rule\n")
        print(f"Weights stored in fp16, k = min(64, d // 4), Eq. 3 of a rank-8 LoRA, target = source + 0.5 % noise; "
              f"`python -m bench.accuracy --part basis` ({opts.threads} thread, a shared machine: seconds are noisy)\n")
        print("\n".join(part_basis(shapes, opts.tol)) + "\n")  # type: ignore[arg-type]
    if opts.part in ("cache", "both"):
        print("### Bases held in half precision (`--cache-dtype`)\n")
        print("The engine's bases (default settings) of each SDXL shape of `--scale ci`, `U` and `V` rounded to the cache dtype; "
              "relative Frobenius error of the projected update (Eq. 3, rank-8 LoRA) against the same projection with the float32 "
              "bases and with exact float64 bases of the same fp16-stored weights. fp16 weight floor: exact bases of the fp32 weights "
              f"against exact bases of their fp16 copies. `python -m bench.accuracy --part cache` ({opts.threads} thread)\n")
        print("\n".join(part_cache(opts.reps)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
