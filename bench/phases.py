"""The benchmark's phases, each run in a fresh child process so that its peak memory is its own.

``python -m bench.phases PHASE --args JSON`` writes ``<work>/<name>.json``. Phases:

* ``generate``: synthetic bases and LoRAs (:mod:`bench.synth`); not timed.
* ``recipe``: the paper's recipe, timed: per touched module, full ``torch.linalg.svd`` of the source
  and the target weight (float32, on the device), truncation to k, Φ, then the dense Eq. 3 (or
  four-term) projection of the dense ``ΔW``. Projectors are applied as ``U(UᵀX)`` (no ``m × m``
  projector is formed) and the dense result is not written anywhere, both in the recipe's favour.
  It may run on a stratified sample of modules; per-module times are recorded either way, and the
  top-k bases it found are saved (after the clock stops) for the evaluation.
* ``engine``: ``prolora_core.cli.main(["transfer", …])`` in-process: ``SafetensorsWeights`` +
  ``BasisCache`` + ``plan_by_names`` + ``transfer`` + writing the output and the JSON report,
  timed from the call to its return (imports and a device warm-up excluded, as for the recipe).
* ``eval``: not timed. Exact top-k bases (float64 full SVD, or the recipe's float32 ones), the
  engine's randomized bases read back from its cache, the engine's output LoRAs; relative errors of
  the dense updates, subspace errors ``1 − Φ``, and the exact Φ between source and target.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import pstats
import resource
import sys
import threading
import time
from pathlib import Path

import psutil
import torch


# ---------------------------------------------------------------- process-level measurement
def _hwm_kib() -> float:
    """This process's RSS high-water mark: ``VmHWM`` (reset by exec, unlike ``ru_maxrss``, which a
    child inherits from the parent it was forked from), else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1])
    except OSError:
        pass
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


class Monitor:
    """Peak RSS of this process: ``ru_maxrss`` (exact) and a 10 ms sampler of RSS and anonymous RSS."""

    def __init__(self, device: torch.device) -> None:
        self.proc = psutil.Process()
        self.device = device
        self.peak_rss = self.peak_anon = 0
        self.base_rss = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def _sample(self) -> None:
        mi = self.proc.memory_info()
        self.peak_rss = max(self.peak_rss, mi.rss)
        self.peak_anon = max(self.peak_anon, mi.rss - getattr(mi, "shared", 0))

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self._sample()

    def result(self) -> dict:
        self._sample()
        self._stop.set()
        self._thread.join()
        out = {"peak_rss_mib": max(_hwm_kib() / 1024, self.peak_rss / 2**20), "peak_anon_mib": self.peak_anon / 2**20,
               "base_rss_mib": self.base_rss / 2**20}
        if self.device.type == "cuda":
            out["peak_gpu_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(device: torch.device) -> None:
    """First-call costs (BLAS/LAPACK/cuSOLVER handles, kernels) outside every timed region."""
    a = torch.randn(96, 80, device=device)
    torch.linalg.svd(a, full_matrices=False)
    torch.linalg.qr(a)
    _ = a @ a.T
    a64 = a.double()
    torch.linalg.svd(a64, full_matrices=False)
    torch.linalg.qr(a64)
    sync(device)


def resolve(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ---------------------------------------------------------------- dense maths (independent of the engine)
def k_rule(m: int, n: int) -> int:
    return max(1, min(64, min(m, n) // 4))


def dense_transfer(D: torch.Tensor, Us: torch.Tensor, Vs: torch.Tensor, Ut: torch.Tensor, Vt: torch.Tensor, mode: str) -> torch.Tensor:
    """Eq. 3 (``prolora``) or the four-term map (``prolora-full``) of the dense ``D`` (m × n)."""
    def pl(U, X):  # P_U X
        return U @ (U.T @ X)

    def pr(X, V):  # X P_V
        return (X @ V) @ V.T

    if mode == "prolora":
        par = pl(Us, pr(D, Vs))
        perp = D - pl(Us, D)
        perp = perp - pr(perp, Vs)
        out = pl(Ut, pr(par, Vt))
        tperp = perp - pl(Ut, perp)
        return out + (tperp - pr(tperp, Vt))
    if mode == "prolora-full":
        L = pl(Ut, pl(Us, D))
        Ps = D - pl(Us, D)
        L = L + (Ps - pl(Ut, Ps))
        R = pr(pr(L, Vs), Vt)
        Qs = L - pr(L, Vs)
        return R + (Qs - pr(Qs, Vt))
    if mode == "subspace":
        return pl(Ut, pr(pl(Us, pr(D, Vs)), Vt))
    raise ValueError(mode)


def phi(A: torch.Tensor, B: torch.Tensor) -> float:
    return float((A.T @ B).square().sum()) / A.shape[1]


def subspace_error(exact: torch.Tensor, B: torch.Tensor) -> float:
    """``1 − Φ`` as ``‖(I − P_exact) B‖_F² / k`` (≥ 0 even when ``B``, float32, is not exactly orthonormal)."""
    return max(0.0, float(B.square().sum() - (exact.T @ B).square().sum())) / B.shape[1]


def exact_topk(W: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of a full SVD, preceded by a QR of the long side (same result, cheaper for tall/wide)."""
    m, n = W.shape
    if m >= 2 * n:
        Q, R = torch.linalg.qr(W)
        Ur, S, Vh = torch.linalg.svd(R)
        return (Q @ Ur[:, :k]), S[:k], Vh[:k].T
    if n >= 2 * m:
        Q, R = torch.linalg.qr(W.T)
        Ur, S, Vh = torch.linalg.svd(R)  # Wᵀ = Q Ur S Vh → W = Vhᵀ S (Q Ur)ᵀ
        return Vh[:k].T, S[:k], (Q @ Ur[:, :k])
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :k], S[:k], Vh[:k].T


# ---------------------------------------------------------------- phases
def phase_generate(a: dict) -> dict:
    from .shapes import modules_for
    from .synth import generate, is_generated, manifest_for

    device = resolve(a["device"])
    mods = modules_for(a["scale"])
    manifest = manifest_for(a["scale"], a["spectrum"], mods, getattr(torch, a["weight_dtype"]), a["perturbation"], a["seed"])
    folder = Path(a["folder"])
    if is_generated(folder, manifest) and not a.get("regenerate"):
        return {"reused": True, "seconds": 0.0}
    t0 = time.perf_counter()
    generate(folder, manifest, mods, device, log=lambda s: print(s, file=sys.stderr, flush=True))
    return {"reused": False, "seconds": time.perf_counter() - t0}


def _stratified(groups: dict[tuple[int, int], list[int]], per_shape: int) -> list[int]:
    picked: list[int] = []
    for idx in groups.values():
        if per_shape >= len(idx):
            picked += idx
        elif per_shape == 1:
            picked.append(idx[len(idx) // 2])
        else:
            picked += sorted({idx[round(j * (len(idx) - 1) / (per_shape - 1))] for j in range(per_shape)})
    return sorted(picked)


def phase_recipe(a: dict) -> dict:
    from safetensors import safe_open
    from safetensors.torch import save_file

    device = resolve(a["device"])
    folder = Path(a["folder"])
    manifest = json.loads((folder / "manifest.json").read_text())
    mods = [(name, tuple(shape)) for name, shape in manifest["modules"]]
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (_, shape) in enumerate(mods):
        groups.setdefault(shape, []).append(i)
    sample = a["sample"]  # "all" or per-shape count
    first = list(range(len(mods))) if sample == "all" else _stratified(groups, int(sample))
    warm_up(device)
    mon = Monitor(device)
    bases: dict[str, torch.Tensor] = {}
    times: dict[int, float] = {}
    phis: dict[str, list[float]] = {}

    def one(i: int, src, tgt, lora) -> None:
        name, (m, n) = mods[i]
        t0 = time.perf_counter()
        key = f"model.diffusion_model.{name}.weight"
        Ws = src.get_tensor(key).to(device=device, dtype=torch.float32)
        Wt = tgt.get_tensor(key).to(device=device, dtype=torch.float32)
        U1, S1, V1h = torch.linalg.svd(Ws, full_matrices=False)
        U2, S2, V2h = torch.linalg.svd(Wt, full_matrices=False)
        k = k_rule(m, n)
        Us, Vs, Ut, Vt = U1[:, :k], V1h[:k].T, U2[:, :k], V2h[:k].T
        pu, pv = phi(Us, Ut), phi(Vs, Vt)
        up = lora.get_tensor(f"{name}.lora_up.weight").to(device, torch.float32)
        down = lora.get_tensor(f"{name}.lora_down.weight").to(device, torch.float32)
        alpha = float(lora.get_tensor(f"{name}.alpha"))
        D = (alpha / down.shape[0]) * (up @ down)
        out = dense_transfer(D, Us, Vs, Ut, Vt, a["mode"]) if min(pu, pv) >= a["threshold"] else D * 0
        sync(device)
        times[i] = time.perf_counter() - t0
        del out
        for tag, t in (("Us", Us), ("Vs", Vs), ("Ut", Ut), ("Vt", Vt)):
            bases[f"{name}.{tag}"] = t.to("cpu").contiguous()
        phis[name] = [pu, pv]

    t_all = time.perf_counter()
    src = safe_open(str(folder / "source.safetensors"), framework="pt", device="cpu")
    tgt = safe_open(str(folder / "target.safetensors"), framework="pt", device="cpu")
    lora = safe_open(str(folder / a["lora"]), framework="pt", device="cpu")
    overhead = time.perf_counter() - t_all
    for i in first:
        one(i, src, tgt, lora)
    rest = [i for i in range(len(mods)) if i not in times]
    means = {shape: sum(times[i] for i in idx if i in times) / max(1, sum(i in times for i in idx)) for shape, idx in groups.items()}
    estimate_rest = sum(means[mods[i][1]] for i in rest)
    ran_rest = bool(rest) and a.get("budget") is not None and estimate_rest <= float(a["budget"])
    if ran_rest:
        for i in rest:
            one(i, src, tgt, lora)
    measured = time.perf_counter() - t_all
    complete = len(times) == len(mods)
    means = {shape: sum(times[i] for i in idx if i in times) / max(1, sum(i in times for i in idx)) for shape, idx in groups.items()}
    estimate = overhead + sum(len(idx) * means[shape] for shape, idx in groups.items())
    peaks = mon.result()
    save_file(bases, str(Path(a["work"]) / "recipe_bases.safetensors"))
    return {
        "seconds": measured if complete else estimate, "measured_seconds": measured, "extrapolated": not complete,
        "modules_run": len(times), "modules": len(mods), "estimate_rest_after_sample": estimate_rest, "ran_rest": ran_rest,
        "per_shape_mean_s": {f"{s[0]}x{s[1]}": v for s, v in means.items()}, "per_shape_count": {f"{s[0]}x{s[1]}": len(v) for s, v in groups.items()},
        "svds": 2 * len(times), "svds_total": 2 * len(mods), "evaluated": [mods[i][0] for i in sorted(times)], "phi": phis, **peaks,
    }


def engine_argv(a: dict, device: torch.device) -> list[str]:
    """The engine's command line (``python -m prolora_core transfer …``) for one run."""
    folder = Path(a["folder"])
    return ["transfer", "--source-base", str(folder / "source.safetensors"), "--target-base", str(folder / "target.safetensors"),
            "--lora", str(folder / a["lora"]), "--out", a["out"], "--report", a["report"], "--mode", a["mode"],
            "--threshold", str(a["threshold"]), "--cache-dir", a["cache"], "--device", device.type, "--pairing", a.get("pairing", "name"),
            *(["--threads", str(a["cli_threads"])] if a.get("cli_threads") else []),
            *(["--key-map", a["key_map"]] if a.get("key_map") else [])]


class Silence:
    """The longest time without a progress call: from ``start`` to the first, between calls, and
    from the last to ``stop``."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def start(self) -> None:
        self.times = [time.perf_counter()]

    def __call__(self, *_: object) -> None:
        self.times.append(time.perf_counter())

    def stop(self) -> tuple[float, float]:
        """(longest gap up to the last progress call, time from the last call to the end)."""
        end = time.perf_counter()
        gaps = [b - a for a, b in zip(self.times, self.times[1:])]
        return (max(gaps) if gaps else 0.0), end - self.times[-1]


SILENCE = Silence()


def _record_cli_progress() -> None:
    """The CLI's progress printer, wrapped so that each call is timed (the engine's own callback)."""
    from prolora_core import cli

    class Timed(cli._Progress):
        def __call__(self, i: int, total: int, key: str) -> None:
            SILENCE()
            super().__call__(i, total, key)

    cli._Progress = Timed  # type: ignore[misc]


def phase_engine(a: dict) -> dict:
    from prolora_core.cli import main

    device = resolve(a["device"])
    argv = engine_argv(a, device)
    warm_up(device)
    _record_cli_progress()
    mon = Monitor(device)
    SILENCE.start()
    prof = cProfile.Profile() if a.get("profile") else None
    t0 = time.perf_counter()
    if prof is not None:
        prof.enable()
    rc = main(argv)
    sync(device)
    seconds = time.perf_counter() - t0
    silence, tail = SILENCE.stop()
    if prof is not None:
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(30)
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(20)
        Path(a["profile"]).write_text(buf.getvalue())
    peaks = mon.result()
    if rc != 0:
        raise SystemExit(f"prolora_core transfer exited with {rc}")
    report = json.loads(Path(a["report"]).read_text())
    s = report["summary"]
    phis = {m["source"]: [m["similarity_u"], m["similarity_v"]] for m in report["modules"] if m["similarity_u"] is not None}
    return {"seconds": seconds, "svd_computed": s["svd_computed"], "bases_from_cache": s["bases_from_cache"], "engine_seconds": s["seconds"],
            "transferred": s["transferred"], "modules": s["modules"], "worst_subspace_change": s["worst_subspace_change"],
            "phi": phis, "silence": silence, "tail": tail, "pairs": {m["source"]: m["target"] for m in report["modules"]}, **peaks}


def phase_bases(a: dict) -> dict:
    """Bases of every weight of both files (no cache), batched (``BasisProvider.prefetch``) or one
    at a time (``BasisProvider.get``, the per-module path), reading the files as the engine does."""
    from prolora_core.basis import BasisSettings, default_rank
    from prolora_core.linalg import matrix_shape
    from prolora_core.match import BasisProvider
    from prolora_core.weights import SafetensorsWeights

    device = resolve(a["device"])
    folder = Path(a["folder"])
    src, tgt = SafetensorsWeights(folder / "source.safetensors"), SafetensorsWeights(folder / "target.safetensors")
    requests = [(w, key, default_rank(*matrix_shape(w.shape(key)))) for key in src.keys() for w in (src, tgt)]
    warm_up(device)
    provider = BasisProvider(BasisSettings(), device, None, a.get("batch_mb"))
    mon = Monitor(device)
    SILENCE.start()
    t0 = time.perf_counter()
    if a["batched"]:
        provider.prefetch(requests, SILENCE)
    else:
        for w, key, k in requests:
            SILENCE()
            provider.get(w, key, k)
    sync(device)
    seconds = time.perf_counter() - t0
    silence, tail = SILENCE.stop()
    silence = max(silence, tail)
    peaks = mon.result()
    elements = sum(math.prod(w.shape(key)) for w, key, _ in requests)
    iters = [b.iterations for b in provider._ready.values()]
    unc = [b.uncertainty for b in provider._ready.values()]
    return {"seconds": seconds, "bases": provider.stats.svd_computed, "elements": elements, "silence": silence,
            "iterations": [min(iters), max(iters)], "worst_uncertainty": max(unc), "batch_mb": provider.batch_mb, **peaks}


def factored_transfer(B: torch.Tensor, A: torch.Tensor, scale: float, Us, Vs, Ut, Vt, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The same maps as :func:`dense_transfer` on ``ΔW = scale·B A``, as factors ``(up, down)`` with the
    scale folded into ``up`` (Eq. 3 is ``[B_∥ B_⊥][A_∥; A_⊥]``); written here, not taken from the engine."""
    Bp = Ut @ (Ut.T @ (Us @ (Us.T @ B)))
    Ap = ((A @ Vs) @ Vs.T @ Vt) @ Vt.T
    Bs = B - Us @ (Us.T @ B)
    Bq = Bs - Ut @ (Ut.T @ Bs)
    As = A - (A @ Vs) @ Vs.T
    Aq = As - (As @ Vt) @ Vt.T
    if mode == "prolora":
        return scale * torch.cat([Bp, Bq], 1), torch.cat([Ap, Aq], 0)
    if mode == "prolora-full":
        return scale * (Bp + Bq), Ap + Aq
    if mode == "subspace":
        return scale * Bp, Ap
    raise ValueError(mode)


def exact_bases(folder: Path, name: str, key: str, k: int, device: torch.device, src_w, tgt_w) -> dict[str, torch.Tensor]:
    """Float64 top-k bases of the source and target weight of one module, computed once per data set
    and stored with it (``exact64/<module>.safetensors``), like the data themselves."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = folder / "exact64" / f"{name}.safetensors"
    if path.exists():
        with safe_open(str(path), framework="pt", device="cpu") as f:
            if f.get_tensor("Us").shape[1] == k:
                return {t: f.get_tensor(t).to(device) for t in ("Us", "Vs", "Ut", "Vt")}
    f64 = torch.float64
    Us, _, Vs = exact_topk(src_w.get(key).to(device, f64), k)
    Ut, _, Vt = exact_topk(tgt_w.get(key).to(device, f64), k)
    out = {"Us": Us, "Vs": Vs, "Ut": Ut, "Vt": Vt}
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file({t: v.to("cpu").contiguous() for t, v in out.items()}, str(tmp))
    tmp.replace(path)
    return out


def phase_eval(a: dict) -> dict:
    from safetensors import safe_open

    from prolora_core.basis import BasisSettings
    from prolora_core.cache import BasisCache
    from prolora_core.weights import SafetensorsWeights

    device = resolve(a["device"])
    folder = Path(a["folder"])
    work = Path(a["work"])
    names: list[str] = a["modules"]
    shapes = {name: tuple(shape) for name, shape in json.loads((folder / "manifest.json").read_text())["modules"]}
    exact64 = a["exact_dtype"] == "float64"
    try:  # the very settings the CLI used, so that the same cache folder is read
        from prolora_core.cli import _basis_settings, build_parser

        settings = _basis_settings(build_parser().parse_args(engine_argv(dict(a, lora="lora_a.safetensors", out="-", report="-"), device)))
    except Exception:  # noqa: BLE001 - an older/newer CLI: the defaults
        settings = BasisSettings()
    cache = BasisCache(a["cache"], settings)
    src_w = SafetensorsWeights(folder / "source.safetensors", cache.memo_dir)
    tgt_w = SafetensorsWeights(folder / "target.safetensors", cache.memo_dir)
    recipe = safe_open(str(work / "recipe_bases.safetensors"), framework="pt", device="cpu")
    loras = {tag: safe_open(str(folder / f"{tag}.safetensors"), framework="pt", device="cpu") for tag in ("lora_a", "lora_b")}
    outs = {tag: safe_open(path, framework="pt", device="cpu") for tag, path in a["outputs"].items()}
    out_keys = {tag: set(f.keys()) for tag, f in outs.items()}
    f64 = torch.float64
    rows = []
    dense_check = None
    t_exact = 0.0
    t0 = time.perf_counter()

    def rel_err(up: torch.Tensor, down: torch.Tensor, ref: torch.Tensor, ref_norm: float) -> float:
        return float(torch.linalg.norm(up @ down - ref)) / max(ref_norm, 1e-300)

    for name in names:
        m, n = shapes[name]
        k = k_rule(m, n)
        key = f"model.diffusion_model.{name}.weight"
        row: dict = {"module": name, "shape": [m, n], "k": k}
        recipe_b = {t: recipe.get_tensor(f"{name}.{t}").to(device, f64) for t in ("Us", "Vs", "Ut", "Vt")}
        if exact64:
            te = time.perf_counter()
            ex = exact_bases(folder, name, key, k, device, src_w, tgt_w)
            t_exact += time.perf_counter() - te
        else:
            ex = recipe_b
        Us, Vs, Ut, Vt = (ex[t] for t in ("Us", "Vs", "Ut", "Vt"))
        row["phi_exact"] = [phi(Us, Ut), phi(Vs, Vt)]
        fast = {}
        for tag, wsrc in (("s", src_w), ("t", tgt_w)):
            b = cache.load(wsrc.content_key(key), k, (m, n))
            if b is None:
                raise SystemExit(f"eval: no cached basis for {name} ({tag}); did the cold run use this cache?")
            fast[tag] = (b.U.to(device, f64), b.V.to(device, f64), b.iterations, b.subspace_change)
        row["sub_err_U"] = [subspace_error(Us, fast["s"][0]), subspace_error(Ut, fast["t"][0])]
        row["sub_err_V"] = [subspace_error(Vs, fast["s"][1]), subspace_error(Vt, fast["t"][1])]
        row["iterations"] = [fast["s"][2], fast["t"][2]]
        if exact64:
            row["recipe_sub_err_U"] = [subspace_error(Us, recipe_b["Us"]), subspace_error(Ut, recipe_b["Ut"])]
            row["recipe_sub_err_V"] = [subspace_error(Vs, recipe_b["Vs"]), subspace_error(Vt, recipe_b["Vt"])]
        for tag, lora in loras.items():
            up = lora.get_tensor(f"{name}.lora_up.weight").to(device, f64)
            down = lora.get_tensor(f"{name}.lora_down.weight").to(device, f64)
            scale = float(lora.get_tensor(f"{name}.alpha")) / down.shape[0]
            rup, rdown = factored_transfer(up, down, scale, Us, Vs, Ut, Vt, a["mode"])
            ref = rup @ rdown
            ref_norm = float(torch.linalg.norm(ref))
            if dense_check is None:  # the factored reference against the dense formula, once
                dense = dense_transfer(scale * (up @ down), Us, Vs, Ut, Vt, a["mode"])
                dense_check = {"module": name, "rel_diff": float(torch.linalg.norm(dense - ref)) / max(ref_norm, 1e-300)}
                del dense
            if tag in outs and f"{name}.lora_up.weight" in out_keys[tag]:
                o = outs[tag]
                oup = o.get_tensor(f"{name}.lora_up.weight").to(device, f64).reshape(m, -1)
                odown = o.get_tensor(f"{name}.lora_down.weight").to(device, f64)
                odown = odown.reshape(odown.shape[0], -1)
                oscale = float(o.get_tensor(f"{name}.alpha")) / odown.shape[0]
                row[f"err_{tag}"] = rel_err(oscale * oup, odown, ref, ref_norm)
            else:
                row[f"err_{tag}"] = None
            if tag == "lora_a" and exact64:
                rb = recipe_b
                row["err_recipe"] = rel_err(*factored_transfer(up, down, scale, rb["Us"], rb["Vs"], rb["Ut"], rb["Vt"], a["mode"]), ref, ref_norm)
            del ref
        rows.append(row)
    return {"rows": rows, "exact_dtype": a["exact_dtype"], "dense_check": dense_check, "seconds": time.perf_counter() - t0,
            "exact_seconds": t_exact}


PHASES = {"generate": phase_generate, "recipe": phase_recipe, "engine": phase_engine, "eval": phase_eval, "bases": phase_bases}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("phase", choices=sorted(PHASES))
    ap.add_argument("--args", required=True, help="JSON file with the phase's arguments (``result`` names the output file)")
    ns = ap.parse_args()
    a = json.loads(Path(ns.args).read_text())
    if a.get("threads"):
        torch.set_num_threads(int(a["threads"]))
    res = PHASES[ns.phase](a)
    res["loadavg"] = os.getloadavg()
    Path(a["result"]).write_text(json.dumps(res))


if __name__ == "__main__":
    main()
