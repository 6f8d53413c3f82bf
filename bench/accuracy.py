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

from prolora_core.basis import CACHE_DTYPES, Basis, BasisSettings, _uncertainty, compute_basis, compute_bases, default_rank
from prolora_core.cache import BasisCache

from .phases import factored_transfer
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


def _unrestarted(A: torch.Tensor, k: int, l: int, settings: BasisSettings, shapes: list[tuple[int, ...]]) -> list[Basis]:
    """The engine's first block Krylov version, without restart (kept here for comparison): Musco & Musco 2015, Alg. 2, on a batch ``A`` ``[B, m, n]``, built as a
    block Golub–Kahan recursion with full re-orthogonalisation, each item stopping on its own test.

    Right blocks ``W_0 = orth(Ω)``, ``W_{j+1} = orth(Aᵀ Q_j ⊥ W_0..W_j)``; left blocks
    ``A W_j = Σ_{i≤j} Q_i R_ij`` (block Gram–Schmidt, twice). So ``A W = Q R`` with ``W`` (``n × L``)
    and ``Q`` (``m × L``) orthonormal, ``L = (j + 1)·l``, and ``span W`` is the Krylov space
    ``{Ω, AᵀAΩ, …, (AᵀA)ʲΩ}``. The Ritz bases come from the SVD of the small ``R``: ``U = Q U_R``,
    ``V = W V_R``. Step ``j`` costs two products with ``A`` (as one subspace iteration does), and the
    top-k subspace converges at the Chebyshev rate, ≈ ``exp(−2j·√gap)`` instead of ``(1 + gap)^{−2j}``
    (gap = ``σ_k / σ_{l+1} − 1``). After each step the top-k Ritz subspace is compared with the
    previous one; an item stops once its estimated distance to the exact subspace (:func:`_uncertainty`)
    is ≤ ``tol``, after ``max_iter`` steps, or when ``L`` reaches ``min(m, n)`` (the last block narrower)."""
    b, m, n = A.shape
    dt, dev = A.dtype, A.device
    # The test matrix is drawn on the CPU from a seeded generator, so the same seed gives the same
    # start on every device (and for every item of a batch).
    gen = torch.Generator(device="cpu").manual_seed(settings.seed)
    omega = torch.randn(n, l, generator=gen, dtype=settings.compute_dtype).to(dev)
    W = torch.linalg.qr(omega)[0].expand(b, n, l).contiguous()
    Q, R = torch.linalg.qr(A @ W)  # B × m × l, B × l × l
    Ur, Sr, Vrh = torch.linalg.svd(R)
    prev = Ur[..., :k]
    d = min(m, n)
    out: list[Basis | None] = [None] * b
    last = [1.0] * b  # the previous step's sin θ_max(previous, current) of each item
    active = list(range(b))  # the batch rows of Q, R, W, A belong to these items
    for it in range(1, settings.max_iter + 1):
        L0 = Q.shape[-1]
        lj = min(l, d - L0)  # the last block may be narrower: the Krylov space cannot outgrow min(m, n)
        final = it == settings.max_iter or L0 + lj >= d
        Z = A.mT @ Q[..., L0 - lj:]  # n × lj: the next direction of the right Krylov space
        for _ in range(2):
            Z = Z - W @ (W.mT @ Z)
        W = torch.cat([W, torch.linalg.qr(Z)[0]], -1)
        Y = A @ W[..., L0:]
        C = Q.mT @ Y
        Y = Y - Q @ C
        C2 = Q.mT @ Y
        Y = Y - Q @ C2
        Qn, Rn = torch.linalg.qr(Y)
        Q = torch.cat([Q, Qn], -1)
        R = torch.cat([torch.cat([R, C + C2], -1), torch.cat([torch.zeros(len(active), lj, L0, dtype=dt, device=dev), Rn], -1)], -2)
        Ur, Sr, Vrh = torch.linalg.svd(R)
        cur = Ur[..., :k]
        M = prev.mT @ cur[..., :L0, :]  # k × k: the cosines of the principal angles are its singular values
        ch = (1.0 - M.square().sum((-2, -1)) / k).clamp_min(0.0).tolist()
        # sin θ_max = ‖(I − P_prev) cur‖₂, from the residual itself (1 − cos² would lose it to rounding below ~1e-3)
        res = cur.clone()
        res[..., :L0, :] -= prev @ M
        sin = torch.linalg.eigvalsh(res.mT @ res)[..., -1].clamp_min(0.0).sqrt().tolist()
        keep = []
        for j, i in enumerate(active):
            unc = _uncertainty(sin[j], last[i])
            last[i] = sin[j]
            if unc <= settings.tol or final:
                U = Q[j] @ Ur[j, :, :k]
                V = W[j] @ Vrh[j, :k].T
                out[i] = Basis(U.contiguous(), Sr[j, :k].contiguous(), V.contiguous(), shapes[i], "randomized", it, ch[j], unc)
            else:
                keep.append(j)
        if not keep:
            break
        if len(keep) < len(active):
            idx = torch.tensor(keep, device=dev)
            A, Q, R, W, cur = (t.index_select(0, idx) for t in (A, Q, R, W, cur))
            active = [active[j] for j in keep]
        prev = cur
    return [b_ for b_ in out if b_ is not None]


def block_krylov_unrestarted(w: torch.Tensor, k: int, p: int, tol: float) -> tuple[Basis, int]:
    m, n = w.shape
    b = _unrestarted(w.float()[None], k, min(k + p, min(m, n) // 2), BasisSettings(oversample=p, tol=tol), [(m, n)])[0]
    return b, b.iterations


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
            row("block Krylov, no restart, p = 16", f"estimated sin θ_max ≤ {BasisSettings().tol:g}",
                lambda w: block_krylov_unrestarted(w, k, 16, BasisSettings().tol))
            for p in (16, 32):
                for tol in tols:
                    s = BasisSettings(method="randomized", oversample=p, tol=tol)
                    default = p == BasisSettings().oversample and tol == BasisSettings().tol
                    row(f"block Krylov, thick restart, p = {p}", f"estimated sin θ_max ≤ {tol:g}" + (" (now, default)" if default else ""),
                        lambda w, s=s: (lambda b: (b, b.iterations))(compute_basis(w, k, s)))
    return lines


def part_cache(reps: int, shapes: list[tuple[int, int]]) -> list[str]:
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


def part_ci(reps: int) -> list[str]:
    """The 44 bases of ``--scale ci`` (22 SDXL modules, source and target), computed by the old subspace
    iteration and by the engine, interleaved module by module so both see the same machine load."""
    from .shapes import ci_modules

    lines = ["| spectrum | bases | subspace iteration p = 16 (before) s | steps | block Krylov, thick restart (now) s | steps | before / now |",
             "|---|---|---|---|---|---|---|"]
    for spectrum in ("gapped", "powerlaw"):
        t_old = t_new = 0.0
        its_old: list[int] = []
        its_new: list[int] = []
        count = 0
        for i, mod in enumerate(ci_modules()):
            m, n = mod.shape
            k = default_rank(m, n)
            ws, wt, _, _ = pair(spectrum, m, n, seed=i)
            for w in (ws.half().float(), wt.half().float()):
                best_old = best_new = math.inf
                for _ in range(reps):
                    t0 = time.perf_counter()
                    _, it = subspace_iteration(w, k, 16)
                    best_old = min(best_old, time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    b = compute_basis(w, k)
                    best_new = min(best_new, time.perf_counter() - t0)
                t_old, t_new = t_old + best_old, t_new + best_new
                its_old.append(it)
                its_new.append(b.iterations)
                count += 1
        lines.append(f"| {spectrum} | {count} | {t_old:.2f} | {min(its_old)}–{max(its_old)} | {t_new:.2f} | {min(its_new)}–{max(its_new)} | "
                     f"{t_old / t_new:.2f}× |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("basis", "ci", "cache", "both"), default="both", help="both = basis, ci and cache")
    ap.add_argument("--shapes", default="1280x1280,10240x1280", help="part basis: comma list of m x n")
    ap.add_argument("--tol", type=float, nargs="+", default=[1e-2, 3e-3, 1e-3, 1e-4], help="part basis: block Krylov tolerances")
    ap.add_argument("--cache-shapes", default="640x640,640x2560,1280x1280,5120x640,10240x1280",
                    help="part cache: comma list of m x n (SDXL shapes of --scale ci)")
    ap.add_argument("--reps", type=int, default=5, help="part cache: warm reads timed (best kept)")
    ap.add_argument("--reps-ci", type=int, default=2, help="part ci: timings per basis and algorithm (best kept)")
    ap.add_argument("--threads", type=int, default=1)
    opts = ap.parse_args(argv)
    torch.set_num_threads(opts.threads)
    if opts.part in ("basis", "both"):
        shapes = [tuple(int(x) for x in s.split("x")) for s in opts.shapes.split(",")]
        print("### Randomized bases: algorithm and stopping rule\n")
        print(f"Weights stored in fp16, k = min(64, d // 4), Eq. 3 of a rank-8 LoRA, target = source + 0.5 % noise; "
              f"`python -m bench.accuracy --part basis` ({opts.threads} thread, a shared machine: seconds are noisy)\n")
        print("\n".join(part_basis(shapes, opts.tol)) + "\n")  # type: ignore[arg-type]
    if opts.part in ("ci", "both"):
        print("### The bases of `--scale ci`, before and now\n")
        print(f"Each of the 44 bases (22 SDXL modules, source and target, weights as bench.synth makes them), best of {opts.reps_ci} "
              f"per algorithm, interleaved so both see the same load; `python -m bench.accuracy --part ci` ({opts.threads} thread)\n")
        print("\n".join(part_ci(opts.reps_ci)) + "\n")
    if opts.part in ("cache", "both"):
        print("### Bases held in half precision (`--cache-dtype`)\n")
        print("The engine's bases (default settings) of SDXL shapes, `U` and `V` rounded to the cache dtype; "
              "relative Frobenius error of the projected update (Eq. 3, rank-8 LoRA) against the same projection with the float32 "
              "bases and with exact float64 bases of the same fp16-stored weights. fp16 weight floor: exact bases of the fp32 weights "
              f"against exact bases of their fp16 copies. `python -m bench.accuracy --part cache` ({opts.threads} thread)\n")
        print("\n".join(part_cache(opts.reps, [tuple(int(x) for x in s.split("x")) for s in opts.cache_shapes.split(",")])))  # type: ignore[misc]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
