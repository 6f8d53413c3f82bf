"""Command line: ``python -m prolora_core {transfer,similarity,inspect,cache}``.

Scope: base files are safetensors, or GGUF (ComfyUI-GGUF's naming, dequantized per tensor).
``transfer`` runs :func:`prolora_core.file_transfer.transfer_files`, the path the Transfer LoRA (files)
node runs too. When the ComfyUI host can be imported (``.comfyui`` beside the pack, or
$PROLORA_COMFYUI_DIR), LoRA modules are placed by ComfyUI's own key maps for the model it detects in the
source file (``prolora_host.py``), text encoders a checkpoint carries included; otherwise, or with
``--key-map names``, a module pairs with ``<module>.weight`` directly, through a known prefix
(``diffusion_model.``, ``model.diffusion_model.``, ``unet.``) or through kohya's underscore naming.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from .basis import CACHE_DTYPES, BasisSettings
from .cache import DEFAULT_MAX_GB, BasisCache, default_cache_dir
from .casa import CasaSettings
from .config import default_threads
from .errors import ProLoRAError
from .file_transfer import DetectedModel, DetectFn, transfer_files
from .lora import read_lora
from .names import BaseIndex
from .outputs import DEFAULT_PATTERN, free_path, output_stem
from .projection import MODES
from .safetensors_io import atomic_write, check_output_path
from .transfer import DEFAULT_MODE, DEFAULT_THRESHOLD, PAIRINGS, TransferConfig
from .weights import open_weights

EXIT_ERROR = 2
#: stdout's reader went away (``… | head -1``): what a shell reports for a program SIGPIPE ended
EXIT_BROKEN_PIPE = 141
EXIT_NOTHING = 1


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


class _Progress:
    """Progress lines on stderr: one per 5 % of a phase of 20 steps or more, and, whatever the
    phase, one whenever ``EVERY_S`` seconds have passed since the last line (so a long run is never
    silent for long while work goes on). A phase (bases, projection, writing …) counts from 0."""

    EVERY_S = 2.0

    def __init__(self, what: str) -> None:
        self.what, self.last = what, (-1, -1)
        self.when: float | None = None

    def __call__(self, i: int, total: int, key: str) -> None:
        pct = (100 * (i + 1)) // max(total, 1)
        now = time.monotonic()
        self.when = now if self.when is None else self.when  # counted from the first call
        step = (total, pct // 5)
        if (total >= 20 and step != self.last) or now - self.when >= self.EVERY_S:
            self.last, self.when = step, now
            print(f"[prolora] {self.what} {i + 1}/{total} ({pct}%) {key}", file=sys.stderr, flush=True)


def _lora_paths(items: Sequence[str], folders: Sequence[str] = ()) -> list[Path]:
    """``--lora`` files and folders, then ``--lora-dir`` folders: every ``*.safetensors`` of a folder,
    sorted by name (not recursive)."""
    if not items and not folders:
        raise ProLoRAError("no LoRA given: --lora FILE_OR_FOLDER or --lora-dir FOLDER")
    paths: list[Path] = []
    for folder in folders:
        if not Path(folder).is_dir():
            raise ProLoRAError("--lora-dir needs a folder", file=Path(folder))
    for item in [*items, *folders]:
        p = Path(item)
        if p.is_dir():
            found = sorted(p.glob("*.safetensors"))
            if not found:
                raise ProLoRAError("folder holds no .safetensors LoRA", file=p)
            paths += found
        else:
            paths.append(p)
    unique = list({p.resolve(): p for p in reversed(paths)}.values())[::-1]  # first mention of each file, in order
    if len(unique) < len(paths):
        _warn(f"{len(paths) - len(unique)} LoRA file(s) named twice by --lora (a file and its folder, or one path twice): each is transferred once")
    return unique


SAVE_DTYPES: dict[str, torch.dtype | None] = {"keep": None, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _basis_settings(args: argparse.Namespace) -> BasisSettings:
    held = {"cache_dtype": CACHE_DTYPES[args.cache_dtype]} if args.cache_dtype else {}
    return BasisSettings(method=args.basis_method, seed=args.seed, deterministic=getattr(args, "deterministic", False),
                         compute_dtype=torch.float64 if args.compute_dtype == "float64" else torch.float32, **held)


def _cache(args: argparse.Namespace, settings: BasisSettings) -> BasisCache | None:
    if args.no_cache:
        return None
    return BasisCache(Path(args.cache_dir) if args.cache_dir else default_cache_dir(), settings)


def _add_basis_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--subspace-rank", type=int, default=None, help="k, the subspace dimension (default: min(64, min(m, n) // 4) per module; clamped to min(m, n) - 1)")
    p.add_argument("--basis-method", choices=("auto", "exact", "randomized"), default="auto", help="how the top-k bases are computed (default auto)")
    p.add_argument("--compute-dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--seed", type=int, default=0, help="seed of the randomized range finder")
    p.add_argument("--cache-dtype", choices=tuple(CACHE_DTYPES), default=None,
                   help="precision the bases U, V are held and cached in (default: the compute dtype; README, 'Benchmark')")
    p.add_argument("--cache-dir", default=None, help=f"basis cache folder (default {default_cache_dir()})")
    p.add_argument("--no-cache", action="store_true", help="compute every basis, read and write no cache")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


def _quantized_note(*bases: object) -> dict[str, list[str]]:
    """Say (stderr) which bases came from a block-quantized GGUF file: their bases and Φ are those of
    the dequantized weights. Returns ``{label: quantization types}`` for the report."""
    out = {b.label: b.quantized for b in bases if getattr(b, "quantized", None)}  # type: ignore[attr-defined]
    for label, types in out.items():
        print(f"[prolora] {label} is quantized ({', '.join(types)}): its bases are those of the dequantized weights", file=sys.stderr)
    return out


def _outputs(args: argparse.Namespace, paths: list[Path], inputs: list[str | Path]) -> list[list[Path]]:
    """Per LoRA, per target: ``--out``, else the LoRA's name from ``--name-pattern`` (or
    ``<lora><--suffix>``) in ``--out-dir`` or next to the LoRA, with a numbered suffix rather than
    over an existing file."""
    if args.out:
        out = check_output_path(args.out, inputs)
        if out.exists():
            _warn(f"{out} exists and will be replaced (--out names the file; without it outputs get a new name)")
        return [[out]]
    pattern = "{lora}" + args.suffix if args.suffix is not None else args.name_pattern
    if args.out_dir and not Path(args.out_dir).is_dir():
        raise ProLoRAError("--out-dir is a file, not a folder" if Path(args.out_dir).exists() else "output folder does not exist",
                           file=Path(args.out_dir))
    return [[check_output_path(free_path(Path(args.out_dir) if args.out_dir else p.parent, output_stem(pattern, p, t, args.source_base, args.mode)),
                               inputs) for t in args.target_base] for p in paths]


def _detector(choice: str) -> DetectFn | None:
    """ComfyUI's reading of the base files (``prolora_host.detect_model``: the detected family and
    ComfyUI's LoRA key map for it) when the ComfyUI host can be imported; ``None``: pair by weight
    names. ``choice``: ``auto`` (the host when importable, else names), ``comfyui`` (the host, or an
    error), ``names``."""
    if choice == "names":
        return None
    try:
        import prolora_host  # beside prolora_core in the pack; imports ComfyUI only in ensure_host()

        ready = prolora_host.ensure_host()
    except Exception as e:  # noqa: BLE001 (a ComfyUI that fails to import is reported, then names are used)
        ready, why = False, f"{type(e).__name__}: {e}"
    else:
        why = f"no ComfyUI in {prolora_host.comfyui_dir()} (set PROLORA_COMFYUI_DIR)"
    if not ready:
        if choice == "comfyui":
            raise ProLoRAError(f"--key-map comfyui: the ComfyUI host cannot be imported ({why})")
        print(f"[prolora] ComfyUI's key maps are not available ({why}): LoRA modules are placed by weight names", file=sys.stderr)
        return None

    def detect(weights: object) -> DetectedModel | None:
        label = getattr(weights, "label", weights)
        try:
            found = prolora_host.detect_model(weights)
        except Exception as e:  # noqa: BLE001 (ComfyUI's detection on a file it does not know)
            if choice == "comfyui":
                raise ProLoRAError(f"--key-map comfyui: ComfyUI cannot read this model ({type(e).__name__}: {e})",
                                   file=getattr(weights, "path", label)) from None
            print(f"[prolora] ComfyUI cannot read {label} ({type(e).__name__}: {e}): LoRA modules are placed by weight names", file=sys.stderr)
            return None
        if found is None and choice == "comfyui":
            raise ProLoRAError("--key-map comfyui: ComfyUI does not recognise this model's layout (--key-map names places modules "
                               "by weight names)", file=getattr(weights, "path", label))
        return found

    return detect


def cmd_transfer(args: argparse.Namespace) -> int:
    paths = _lora_paths(args.lora, args.lora_dir)
    for many, what in ((len(paths) > 1, "LoRAs"), (len(args.target_base) > 1, "targets")):
        if many and args.out:
            raise ProLoRAError(f"several {what} need --out-dir (a folder) or no --out (each output is written next to its LoRA), not --out")
    settings = _basis_settings(args)
    threads = args.threads if args.threads is not None else default_threads()
    config = TransferConfig(mode=args.mode, subspace_rank=args.subspace_rank, threshold=args.threshold, pairing=args.pairing,
                            out_rank=args.out_rank, rescale_to_source_norm=args.rescale, strict=args.strict, device=args.device, basis=settings,
                            save_dtype=SAVE_DTYPES[args.save_dtype], cpu_threads=threads,
                            casa=CasaSettings(args.casa_energy, args.casa_tau, args.casa_rho, args.casa_quantile))
    if args.cache_max_mb is not None and args.cache_max_mb < 0:
        raise ProLoRAError(f"--cache-max-mb must not be negative, got {args.cache_max_mb}")
    inputs = [args.source_base, *args.target_base, *paths]
    outs = _outputs(args, paths, inputs)
    seen: dict[Path, Path] = {}
    for lora_path, row in zip(paths, outs):
        for out in row:
            if out.resolve() in seen:
                what = "two LoRAs would be written to the same output" if seen[out.resolve()] != lora_path else \
                    "two targets would be written to the same output (use a --name-pattern with {target})"
                raise ProLoRAError(f"{what} {out} (the other is for {seen[out.resolve()]}); rename one", file=lora_path)
            seen[out.resolve()] = lora_path
    if args.report:
        report_path = check_output_path(args.report, inputs)
        if report_path.resolve() in seen:
            raise ProLoRAError("the report would overwrite the output LoRA; choose another --report name", file=report_path)
    cache = _cache(args, settings)
    max_mb = args.cache_max_mb if args.cache_max_mb is not None else DEFAULT_MAX_GB * 1024

    def wrote(path: Path) -> None:
        print(f"wrote {path}", file=sys.stderr)

    run = transfer_files(args.source_base, args.target_base, paths, config, lambda li, ti: outs[li][ti], detect=_detector(args.key_map),
                         cache=cache, cache_max_bytes=int(max_mb * 2**20) if cache is not None else None, progress=_Progress("step"),
                         say=print, warn=_warn, note=lambda line: print(line, file=sys.stderr), on_saved=wrote, listed_in="--report")
    if run.evicted:
        print(f"[prolora] cache over {max_mb:g} MB: removed the {run.evicted} least recently used bases", file=sys.stderr)
    if args.report:
        one = len(run.targets) == 1
        stats = [t.stats for t in run.targets]
        report = {
            "modules": [m.as_dict() for m in run.modules],
            "summary": {
                "mode": config.mode, "threshold": config.threshold, "pairing": config.pairing, "key_map": run.naming,
                "subspace_rank": config.subspace_rank, "source_base": run.source.label,
                "target_base": run.targets[0].target.label if one else [t.target.label for t in run.targets],
                "loras": {str(r.lora.path): r.summary() for r in run.targets[0].results} if one else
                         {t.target.label: {str(r.lora.path): r.summary() for r in t.results} for t in run.targets},
                "unused": {str(lora.path): lora.unused for lora in run.loras},
                "transferred": sum(m.transferred for m in run.modules), "modules": len(run.modules),
                "svd_computed": sum(s.svd_computed for s in stats), "bases_from_cache": sum(s.bases_from_cache for s in stats),
                "full_svd_computed": sum(s.full_svd_computed for s in stats), "full_bases_from_cache": sum(s.full_bases_from_cache for s in stats),
                "seconds": round(sum(s.seconds for s in stats), 4), "worst_subspace_change": max(s.worst_subspace_change for s in stats),
                "quantized_bases": run.quantized, "save_dtype": args.save_dtype,
                "deterministic": settings.deterministic, "threads": config.threads, "outputs": [str(o) for row in outs for o in row],
            },
        }
        atomic_write(args.report, json.dumps(report, indent=2, sort_keys=True).encode())
    if cache is not None:
        print(cache.describe(args.cache_max_mb / 1024 if args.cache_max_mb is not None else DEFAULT_MAX_GB))
    if not run.written:
        names = ", ".join(str(lora.path) for lora in run.loras)
        _err(f"{names}: no module could be transferred to {', '.join(t.target.label for t in run.targets)} (see the warnings above)")
        return EXIT_NOTHING
    for _, why in run.failed:  # the others were written; the exit code still says something was wrong
        _err(f"left out: {why}")
    return EXIT_ERROR if run.failed else 0


def cmd_similarity(args: argparse.Namespace) -> int:
    from .linalg import matrix_shape, resolve_device
    from .similarity import basis_similarity
    from .transfer import BasisProvider

    settings = _basis_settings(args)
    cache = _cache(args, settings)
    memo = cache.memo_dir if cache is not None else None
    source = open_weights(args.source_base, memo)
    target = open_weights(args.target_base, memo)
    _quantized_note(source, target)
    provider = BasisProvider(settings, resolve_device(args.device), cache)
    tindex, sindex = BaseIndex(target.keys()), BaseIndex(source.keys())
    config = TransferConfig(subspace_rank=args.subspace_rank)
    rows = []
    keys = [k for k in source.keys() if k.endswith(".weight") and len(source.shape(k)) in (2, 4) and min(matrix_shape(source.shape(k))) > 1]
    progress = _Progress("module")
    for i, key in enumerate(keys):
        progress(i, len(keys), key)
        tkey = tindex.find_bare(sindex.bare_name(key))
        if tkey is None or matrix_shape(target.shape(tkey)) != matrix_shape(source.shape(key)):
            rows.append({"module": sindex.bare_name(key), "similarity_u": None, "similarity_v": None, "note": "not in target"})
            continue
        m, n = matrix_shape(source.shape(key))
        k = config.rank_for(m, n)
        s = basis_similarity(provider.get(source, key, k), provider.get(target, tkey, k))
        rows.append({"module": sindex.bare_name(key), "similarity_u": s.phi_u, "similarity_v": s.phi_v, "chance_u": s.chance_u,
                     "chance_v": s.chance_v, "k": k, "shape": [m, n]})
    source.save_memo()
    target.save_memo()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'module':60s} {'k':>4s} {'Φ_U':>6s} {'Φ_V':>6s} {'chance':>7s}")
        for r in rows:
            if r["similarity_u"] is None:
                print(f"{r['module']:60s}    -      -      -  ({r['note']})")
            else:
                print(f"{r['module']:60s} {r['k']:4d} {r['similarity_u']:6.3f} {r['similarity_v']:6.3f} {max(r['chance_u'], r['chance_v']):7.3f}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    lora = read_lora(args.lora)
    updates = [m.update for m in lora.modules.values() if m.update is not None]
    kinds: dict[str, int] = {}
    for m in lora.modules.values():
        kinds[m.kind] = kinds.get(m.kind, 0) + 1
    info = {
        "file": str(lora.path), "modules": len(lora.modules), "dtype": str(lora.dtype).removeprefix("torch."),
        "kinds": kinds, "dora_modules": sum(m.dora_scale is not None for m in lora.modules.values()),
        "ranks": sorted({u.rank for u in updates}),
        "alphas": sorted({u.alpha for u in updates if u.alpha is not None}),
        "conv_modules": sum(u.is_conv for u in updates),
        "unknown_keys": lora.unknown_keys, "unused": lora.unused, "metadata_keys": sorted(lora.metadata),
        "module_names": sorted(lora.modules)[: args.limit],
    }
    print(json.dumps(info, indent=2))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    root = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    cache = BasisCache(root, BasisSettings())
    if root.exists() and not root.is_dir():
        raise ProLoRAError("not a cache folder", file=root)
    if args.clear:
        print(f"cleared {root}: removed {cache.clear()} cache files" if root.is_dir() else f"{root}: empty")
    elif args.max_gb is not None:
        if args.max_gb < 0:
            raise ProLoRAError(f"--max-gb must not be negative, got {args.max_gb:g}")
        removed = cache.limit(args.max_gb) if root.is_dir() else 0
        print(cache.describe(args.max_gb) + f"; removed the {removed} least recently used")
    else:
        print(f"{root}: {cache.size_bytes() / 2**20:.1f} MiB in {cache.entries()} bases (transfer keeps it under {DEFAULT_MAX_GB:g} GB unless "
              "--cache-max-mb says otherwise)" if root.exists() else f"{root}: empty")
    return 0


def _count(text: str) -> int:
    """An argparse type: a whole number ≥ 0."""
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m prolora_core", description="Training-free LoRA transfer between related base models (ProLoRA, arXiv 2506.04244).",
                                 epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("transfer", help="transfer LoRA(s) from a source base to a target base")
    t.add_argument("--source-base", required=True, help="safetensors or .gguf file of the base the LoRA was trained on")
    t.add_argument("--target-base", required=True, action="append", help="safetensors or .gguf file of the base to transfer to; repeat it "
                   "for several targets (Wan 2.2's two experts): one output per LoRA and target, named after the target, source bases computed once")
    t.add_argument("--lora", action="append", default=[], help="LoRA safetensors file or folder (repeatable)")
    t.add_argument("--lora-dir", action="append", default=[], help="a library: every LoRA safetensors in this folder, sorted by name "
                   "(repeatable, combinable with --lora); one pass over the bases serves them all, one summary per LoRA and a count at the end")
    t.add_argument("--out", help="output file (one LoRA); default: next to each LoRA, named by --name-pattern")
    t.add_argument("--out-dir", help="output folder instead of each LoRA's own folder; files are named by --name-pattern")
    t.add_argument("--name-pattern", default=DEFAULT_PATTERN, help=f"output file name without extension (default {DEFAULT_PATTERN}; fields "
                   "{lora} {target} {source} {mode}); an existing file is never overwritten: _2, _3 … is appended")
    t.add_argument("--suffix", default=None, help="name outputs <lora><suffix> instead of --name-pattern")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads for bases and projections (default: half the cores, "
                   f"at most 4: here {default_threads()}), so a transfer leaves room for ComfyUI's sampling")
    t.add_argument("--mode", choices=MODES, default=DEFAULT_MODE, help=f"projection (default {DEFAULT_MODE})")
    t.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="a module transfers when Φ_U and Φ_V both reach it (default 0.8)")
    t.add_argument("--pairing", choices=PAIRINGS, default="name", help="pair modules by name, or each with its most similar same-shape target module")
    t.add_argument("--out-rank", type=int, default=None, help="re-compress each module to this rank (reports the energy dropped)")
    d = CasaSettings()
    t.add_argument("--casa-energy", type=float, default=d.energy, help=f"casa: share of Σσ² of the top source directions (default {d.energy})")
    t.add_argument("--casa-tau", type=float, default=d.tau, help=f"casa: rotation threshold τ joining two directions (default {d.tau})")
    t.add_argument("--casa-rho", type=float, default=d.rho, help=f"casa: density quantile ρ above which a group is protected (default {d.rho})")
    t.add_argument("--casa-quantile", type=float, default=d.arbitrate_q, help=f"casa: score quantile above which entries are arbitrated (default {d.arbitrate_q})")
    t.add_argument("--rescale", action="store_true", help="rescale each transferred module to its source norm")
    t.add_argument("--key-map", choices=("auto", "comfyui", "names"), default="auto",
                   help="how LoRA modules are placed on base weights: ComfyUI's own key map for the model it detects in the source file "
                   "(comfyui; auto uses it when ComfyUI can be imported and recognises the file), or <module>.weight names (names)")
    t.add_argument("--strict", action="store_true", help="a LoRA module without a base weight is an error")
    t.add_argument("--report", help="write the per-module report as JSON")
    t.add_argument("--save-dtype", choices=tuple(SAVE_DTYPES), default="keep",
                   help="dtype of the written tensors (default keep: the input LoRA's; the math runs in float32 either way)")
    t.add_argument("--deterministic", action="store_true",
                   help="compute with one CPU thread, so that the output is bit-for-bit the same whatever the thread count (slower)")
    t.add_argument("--cache-max-mb", type=float, default=None, help="after the run, remove the least recently used bases until the cache holds "
                   f"at most this many MB (default {DEFAULT_MAX_GB * 1024:g})")
    _add_basis_args(t)
    t.set_defaults(func=cmd_transfer)
    s = sub.add_parser("similarity", help="per-module subspace similarity Φ between two bases")
    s.add_argument("--source-base", required=True)
    s.add_argument("--target-base", required=True)
    s.add_argument("--json", action="store_true")
    _add_basis_args(s)
    s.set_defaults(func=cmd_similarity)
    i = sub.add_parser("inspect", help="what a LoRA file holds")
    i.add_argument("lora")
    i.add_argument("--limit", type=_count, default=20, help="how many module names to list (default 20)")
    i.set_defaults(func=cmd_inspect)
    c = sub.add_parser("cache", help="show, limit or clear the basis cache")
    c.add_argument("--cache-dir", default=None)
    c.add_argument("--clear", action="store_true", help="remove every cache file (and nothing else)")
    c.add_argument("--max-gb", type=float, default=None, help="remove the least recently used entries (full SVDs first) until the "
                   "cache takes at most this many GB (2**30 bytes), as a transfer does after its run")
    c.set_defaults(func=cmd_cache)
    return ap


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's exit flush of what is left after a
    BrokenPipeError does not print a second traceback (Python docs, 'signal': note on SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (captured in-process): nothing to flush
        pass


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "threshold", 0.5) is not None and not 0 <= getattr(args, "threshold", 0.5) <= 1:
            raise ProLoRAError(f"--threshold must lie in [0, 1], got {args.threshold}")
        if getattr(args, "threads", None) is not None and args.threads <= 0:
            raise ProLoRAError(f"--threads must be positive, got {args.threads}")
        if getattr(args, "subspace_rank", None) is not None and args.subspace_rank <= 0:
            raise ProLoRAError(f"--subspace-rank must be positive, got {args.subspace_rank}")
        rc = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit flush
        return rc
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except ProLoRAError as e:
        _err(str(e))
        return EXIT_ERROR
    except KeyboardInterrupt:
        _err("interrupted; nothing was written")
        return 130
    except torch.cuda.OutOfMemoryError as e:
        _err(f"out of GPU memory ({e}); try --device cpu")
        return EXIT_ERROR
