"""File to file: source and target base files (safetensors or GGUF) and LoRA files in, one
transferred LoRA file per LoRA and target out. The one path behind the CLI's ``transfer`` command
and the Transfer LoRA (files) node; both only turn their inputs into the arguments here and show
what comes back.

Steps: open the weights (:func:`.weights.open_weights`, streamed per key) → read the LoRAs → place
each module (ComfyUI's key map for the detected model through ``detect``, else ``<module>.weight``
names, as :func:`.plan.plan_by_names` does) → refuse shapes that cannot match with one message
(:mod:`.shapes`) → per target :func:`.transfer.transfer` (every basis is read from the basis cache,
or computed, once per run and kept in memory for all targets and LoRAs: :class:`MemoryBases`) →
metadata (:func:`.provenance.output_metadata`) → atomic save (temp file, then rename) → basis cache
limit. Many LoRAs go through in groups bounded in bytes (:func:`lora_groups`), each written and
released before the next is read.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import Tensor

from .basis import Basis
from .cache import BasisCache
from .config import ProgressFn, TransferConfig
from .errors import ProLoRAError
from .full_bases import FullBases
from .lora import LoraFile, read_lora
from .names import BaseIndex
from .plan import Planned
from .provenance import output_metadata
from .report import ModuleReport, RunStats, TransferResult, format_summary, is_text_encoder_module
from .safetensors_io import atomic_save
from .shapes import check_lora_fits_somewhere, check_shapes_can_match, describe_model, parameter_count
from .slices import with_slices
from .transfer import transfer
from .weights import WeightSource, open_weights

TEXT_ENCODER_REASON = ("text-encoder names are not mapped from files yet "
                       "(the ComfyUI nodes map them, with a CLIP connected to Compute Basis)")
#: LoRA files read, projected and written together, at most (bytes on disk; at least one LoRA): with
#: their outputs about twice this in memory, beside the bases of the touched weights.
GROUP_BYTES = 1 << 30
#: with ComfyUI's key maps, a text-encoder module left out is one whose text encoder the base file lacks
NO_TEXT_ENCODER = ("the source file carries no such text-encoder weight (Flux's CLIP-L/T5, SD3's and Wan's text encoders are separate "
                   "files: transfer those parts with the nodes, a CLIP connected to Compute Basis)")


@dataclass(frozen=True)
class DetectedModel:
    """A base file as the ComfyUI host reads it (``prolora_host.detect_model``).

    ``kind``: ComfyUI's model config class (``Flux``, ``WAN21_T2V``, ``SDXL`` …); ``key_map``: LoRA
    module name → weight key in the file, or a slice's virtual key (:mod:`.slices`); ``unet_config``:
    the detected config (its width names the size); ``prefix``: the diffusion model's key prefix in
    the file (``model.diffusion_model.`` in a checkpoint, ``""`` for a bare diffusion model)."""

    kind: str
    key_map: Mapping[str, str]
    unet_config: Mapping[str, Any] = field(default_factory=dict)
    prefix: str = ""


DetectFn = Callable[[WeightSource], "DetectedModel | None"]


@dataclass
class TargetRun:
    """One target's transfer: a result per LoRA, and the file written for it (``None``: nothing
    could be transferred, nothing written)."""

    target: WeightSource
    results: list[TransferResult]
    stats: RunStats
    written: list[Path | None]


@dataclass
class FilesRun:
    """What :func:`transfer_files` did. ``naming``: how modules were placed (ComfyUI's key map of
    the detected model, or weight names); ``quantized``: label → GGUF quantization types of the bases
    that came from a quantized file; ``lines``: the summary people read."""

    source: WeightSource
    loras: list[LoraFile]
    targets: list[TargetRun]
    naming: str
    quantized: dict[str, list[str]]
    lines: list[str]
    evicted: int = 0
    #: LoRAs left out of a run of several because they could not be read or placed: (path, error)
    failed: list[tuple[Path, ProLoRAError]] = field(default_factory=list)

    @property
    def modules(self) -> list[ModuleReport]:
        return [m for t in self.targets for r in t.results for m in r.modules]

    @property
    def written(self) -> list[Path]:
        return [p for t in self.targets for p in t.written if p is not None]


class MemoryBases:
    """The bases of this run, kept in memory and served by content, in front of the disk cache
    (:class:`.cache.BasisCache`, when there is one): a basis is read from disk or computed once per
    run, then served to every target and every group of LoRAs with no further read, checksum or
    copy. Holds the bases of the weights the run touches, no more (k·(m + n) float32 numbers each:
    ≈ 0.65 GB per side for SDXL's 722 attention and feed-forward weights at k ≤ 64)."""

    def __init__(self, disk: BasisCache | None = None) -> None:
        self.disk = disk
        self._bases: dict[tuple[str, tuple[int, ...]], Basis] = {}

    def load(self, content_key: str, k: int, shape: tuple[int, ...]) -> Basis | None:
        b = self._bases.get((content_key, tuple(shape)))
        if b is None or b.k < k:
            b = self.disk.load(content_key, k, shape) if self.disk is not None else None
            if b is None:
                return None
            self._bases[(content_key, tuple(shape))] = b
        return b.truncate(k) if b.k > k else b

    def store(self, content_key: str, basis: Basis) -> None:
        self._bases[(content_key, tuple(basis.shape))] = basis
        if self.disk is not None:
            self.disk.store(content_key, basis)

    def load_full(self, content_key: str, full_key: str, shape: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor] | None:
        """A full SVD from the disk cache (kept in memory by :class:`.full_bases.FullBases`, within its budget)."""
        return self.disk.load_full(content_key, full_key, shape) if self.disk is not None else None

    def store_full(self, content_key: str, full_key: str, U: Tensor, S: Tensor, V: Tensor) -> None:
        if self.disk is not None:
            self.disk.store_full(content_key, full_key, U, S, V)


def _first(items: Sequence[str], listed_in: str, limit: int = 5) -> str:
    more = f" and {len(items) - limit} more ({listed_in} lists them all)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _quiet(_: str) -> None:
    return None


def transfer_files(
    source_path: str | Path,
    target_paths: Sequence[str | Path],
    lora_paths: Sequence[str | Path],
    config: TransferConfig,
    out_path: Callable[[int, int], Path],
    *,
    detect: DetectFn | None = None,
    need_detect: bool = False,
    cache: BasisCache | None = None,
    cache_max_bytes: int | None = None,
    progress: ProgressFn | None = None,
    check_interrupt: Callable[[], None] | None = None,
    say: Callable[[str], None] = _quiet,
    warn: Callable[[str], None] = _quiet,
    note: Callable[[str], None] = _quiet,
    on_saved: Callable[[Path], str | None] | None = None,
    listed_in: str = "the report",
    group_bytes: int = GROUP_BYTES,
) -> FilesRun:
    """Transfer every LoRA in ``lora_paths`` from the base in ``source_path`` to each base in
    ``target_paths`` (one output per LoRA and target, at ``out_path(lora_index, target_index)``,
    asked when it is written).

    ``detect(weights)`` (the ComfyUI host's ``detect_model``) names the model in a file and gives
    ComfyUI's key map for it; ``None`` from it (or no ``detect``) places modules by weight names,
    unless ``need_detect`` (the files node: ComfyUI must read the file). ``say`` gets the summary
    lines, ``warn`` what the user should look at, ``note`` progress notes; ``on_saved(path)`` may
    return a line to say; a warning naming more than five modules says ``listed_in`` lists them all. ``cache_max_bytes``: after the run, the least recently used bases are
    removed until the cache holds at most that many bytes.

    A library of LoRAs goes through in groups of at most ``group_bytes`` of LoRA files (in order;
    at least one LoRA each): a group is read, projected and written, and its tensors released,
    before the next is read, so memory holds one group, its outputs and the run's bases
    (:class:`MemoryBases`: read from the disk cache or computed once, kept for every group and
    target). Once written, a result keeps its reports and tensor names only (:func:`_released`).
    ``progress(i, total, what)`` is called while reading LoRAs, for every basis, before every
    module's projection and before every output is written (each phase counts from 0).

    Raises :class:`ProLoRAError` for unreadable files, a LoRA none of whose modules maps onto the
    source (of several LoRAs, such a one is only left out: ``FilesRun.failed``, and the others go on), shapes that cannot match (one message naming both models), ``config.strict`` with
    unmapped modules, and every error of :func:`.transfer.transfer`. Outputs are written atomically.
    """
    if not target_paths:
        raise ProLoRAError("no target base given")
    memo = cache.memo_dir if cache is not None else None
    source = open_weights(source_path, memo)
    targets = [open_weights(p, memo) for p in target_paths]
    quantized = {b.label: b.quantized for b in (source, *targets) if getattr(b, "quantized", None)}
    for label, types in quantized.items():
        note(f"[prolora] {label} is quantized ({', '.join(types)}): its bases are those of the dequantized weights")
    found = detect(source) if detect is not None else None
    if found is None and need_detect:
        raise ProLoRAError("ComfyUI cannot detect the model type of this file", file=getattr(source, "path", source.label))
    detected: dict[int, DetectedModel | None] = {id(source): found}

    def family(w: WeightSource) -> DetectedModel | None:
        inner = getattr(w, "inner", w)  # a SlicedWeights' own source
        if id(inner) not in detected:
            detected[id(inner)] = detect(inner) if detect is not None else None
        return detected[id(inner)]

    def describe(w: WeightSource) -> str:
        inner = getattr(w, "inner", w)
        d = family(inner)
        if d is None:
            return describe_model(inner.label, parameter_count(inner))
        return describe_model(d.kind, parameter_count(inner, d.prefix), d.unet_config)

    # Of several LoRAs, one that cannot be read or placed is left out (said, kept in ``failed``) and
    # the others go on; a lone LoRA's error is raised.
    failed: list[tuple[Path, ProLoRAError]] = []

    def left_out(i: int, e: ProLoRAError) -> None:
        if len(lora_paths) == 1:
            raise e
        failed.append((Path(lora_paths[i]), e))
        warn(f"{e} — this LoRA is left out; the others go on")

    if found is not None:
        naming, locate = f"ComfyUI's key map for {found.kind}", found.key_map.get
        unplaced = (f"maps onto the source model {describe(source)} through ComfyUI's key map", ": is it a LoRA for another base model?")
    else:
        naming, locate = "weight names", BaseIndex(source.keys()).resolve  # as plan.plan_by_names places them
        unplaced = (f"has a weight in the source base {source.label}", "")
    te_reason = NO_TEXT_ENCODER if found is not None else TEXT_ENCODER_REASON
    sliced = with_slices(source)
    # The bases of this run stay in memory (read from the disk cache, or computed, once) for every
    # group of LoRAs and every target: k·(m + n) float32 numbers per touched weight.
    bases = MemoryBases(cache)
    # Mode casa / auto: the source's full SVDs, kept for every group and target within a memory budget.
    full = FullBases(bases, disk_max_bytes=cache_max_bytes) if config.mode in ("casa", "auto") else None
    runs = [TargetRun(t, [], RunStats(), []) for t in targets]
    loras: list[LoraFile] = []
    lines: list[str] = []
    n_read = 0

    def said(line: str) -> None:
        lines.append(line)
        say(line)

    for group in lora_groups(lora_paths, group_bytes):
        read: list[tuple[int, LoraFile]] = []
        for i in group:
            if progress is not None:
                progress(n_read, len(lora_paths), f"reading {Path(lora_paths[i]).name}")
            n_read += 1
            try:
                read.append((i, read_lora(lora_paths[i])))
            except ProLoRAError as e:
                left_out(i, e)
        for _, lora in read:
            if lora.unknown_keys:
                warn(f"{lora.path}: {len(lora.unknown_keys)} keys are not used: " + _first([f"{k} ({lora.unused[k]})" for k in lora.unknown_keys], listed_in))
        kept: list[int] = []  # each placed LoRA's index in ``lora_paths``
        placed: list[LoraFile] = []
        plan: list[Planned] = []
        for i, lora in read:
            mine = [Planned(len(placed), mod, locate(mod.name)) for mod in lora.modules.values()]
            if mine and all(p.source_key is None for p in mine):
                left_out(i, ProLoRAError(f"none of the LoRA's {len(mine)} modules {unplaced[0]} (e.g. '{mine[0].module.name}'){unplaced[1]}",
                                         file=lora.path or "<LoRA>"))
                continue
            kept.append(i)
            placed.append(lora)
            plan += mine
        if not placed:
            continue
        _not_mapped(plan, placed, source.label, config.strict, warn, listed_in, te_reason)
        for i, lora in enumerate(placed):
            on = [(p.module.name, p.module.update.matrix_shape, p.source_key) for p in plan
                  if p.lora_index == i and p.source_key is not None and p.module.update is not None and len(sliced.shape(p.source_key)) >= 2]
            check_lora_fits_somewhere(on, sliced, lora.path or "<LoRA>", describe)
        keys = [p.source_key for p in plan if p.source_key is not None]
        n_modules = sum(p.source_key is not None for p in plan)
        for t in targets:
            check_shapes_can_match(sliced, with_slices(t), keys, config.pairing, f"the LoRA's {n_modules} modules" if len(placed) == 1
                                   else f"the {n_modules} modules of the {len(placed)} LoRAs", describe, absent_ok=found is None)
        for ti, (target, run) in enumerate(zip(targets, runs)):
            results, stats = transfer(placed, plan, source, target, config, bases, progress, check_interrupt, full)  # type: ignore[arg-type]
            target.save_memo()
            run.stats.add(stats)
            said(f"ProLoRA {config.mode}, pairing {config.pairing}: {source.label} → {target.label}; bases computed {stats.svd_computed}, "
                 f"from cache {stats.bases_from_cache}"
                 + (f"; full source SVDs computed {stats.full_svd_computed}, from cache {stats.full_bases_from_cache}" if full is not None else "")
                 + f"; CPU threads {config.threads}")
            target_model = family(target) if found is not None else None
            kind = target_model.kind if target_model is not None else None  # names the target in the base-model metadata fields
            for li, result in enumerate(results):
                if check_interrupt is not None:
                    check_interrupt()
                if progress is not None:
                    progress(li, len(results), f"writing {result.lora.path.name if result.lora.path else f'LoRA {li + 1}'}")
                run.written.append(_write(result, li, kept[li], ti, source, target, config, kind, found is not None, out_path, said, warn,
                                          on_saved, listed_in))
                run.results.append(_released(result))
        loras += [_released_lora(lora) for lora in placed]
    if not loras:
        raise failed[0][1] if failed else ProLoRAError("no LoRA given")
    if len(lora_paths) > 1:
        written = sum(p is not None for run in runs for p in run.written)
        said(f"{written} of {len(lora_paths) * len(targets)} outputs written ({len(lora_paths)} LoRAs"
             + (f" × {len(targets)} targets" if len(targets) > 1 else "") + (f"; {len(failed)} left out" if failed else "") + ")")
    source.save_memo()
    evicted = cache.evict(cache_max_bytes) if cache is not None and cache_max_bytes is not None else 0
    return FilesRun(source, loras, runs, naming, quantized, lines, evicted, failed)


def lora_groups(paths: Sequence[str | Path], group_bytes: int) -> list[list[int]]:
    """Indices of ``paths`` in consecutive groups of at most ``group_bytes`` of LoRA files (at least
    one LoRA each; an unreadable size counts 0, its error comes when it is read)."""
    groups: list[list[int]] = []
    size = 0
    for i, p in enumerate(paths):
        try:
            n = os.path.getsize(p)
        except OSError:
            n = 0
        if not groups or size + n > group_bytes:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += n
    return groups


def _write(result: TransferResult, li: int, lora_index: int, ti: int, source: WeightSource, target: WeightSource, config: TransferConfig,
           kind: str | None, comfy_keys: bool, out_path: Callable[[int, int], Path], said: Callable[[str], None], warn: Callable[[str], None],
           on_saved: Callable[[Path], str | None] | None, listed_in: str) -> Path | None:
    """Say one LoRA's summary and write its output atomically (``None``: nothing could be transferred, nothing written)."""
    summary = result.summary()
    for line in format_summary(result.lora.path.name if result.lora.path else f"LoRA {li + 1}", summary, config.threshold,
                               *(("the source file carries no such text-encoder weight",) if comfy_keys else ())):
        said(line)
    if summary["transferred"] == 0:
        said("  nothing written")
        warn(f"{result.lora.path}: no module could be transferred to {target.label}; nothing written for it")
        return None
    out = out_path(lora_index, ti)
    atomic_save(result.tensors, out, output_metadata(result, source.label, target.label, config, kind))
    line = on_saved(out) if on_saved is not None else None
    if line:
        said(line)
    skipped = [m for m in result.modules if not m.transferred and m.source_key is not None]
    if skipped:
        why = [f"{m.source} ({m.reason}" + (f"; best candidate {m.candidate}, Φ {m.candidate_phi:.2f}"
                                            if m.candidate is not None and m.candidate_phi is not None else "") + ")" for m in skipped]
        warn(f"{len(skipped)} modules not transferred to {target.label}: " + _first(why, listed_in))
    return out


def _released(result: TransferResult) -> TransferResult:
    """``result`` once written, holding no tensor data: its tensors as meta tensors (names and shapes,
    which :meth:`TransferResult.summary` counts), its LoRA without modules (:func:`_released_lora`)."""
    return replace(result, lora=_released_lora(result.lora), tensors={k: t.to("meta") for k, t in result.tensors.items()})


def _released_lora(lora: LoraFile) -> LoraFile:
    """``lora`` without its modules (their tensors): path, metadata, unused keys and dtype stay."""
    return replace(lora, modules={})


def _not_mapped(plan: Sequence[Planned], loras: Sequence[LoraFile], source_label: str, strict: bool, warn: Callable[[str], None],
                listed_in: str, te_reason: str) -> None:
    """One warning per reason for LoRA modules without a weight in the source base (an error with
    ``strict``)."""
    missing = [p for p in plan if p.source_key is None]
    te = [p for p in missing if is_text_encoder_module(p.module.name)]
    other = [p for p in missing if not is_text_encoder_module(p.module.name)]
    for group, msg in ((other, f"{len(other)} LoRA modules have no weight in {source_label}"),
                       (te, f"{len(te)} text-encoder modules are left out: {te_reason}")):
        if not group:
            continue
        msg += ": " + _first([f"'{p.module.name}'" for p in group], listed_in)
        if strict:
            raise ProLoRAError(msg + " (--strict)", file=loras[group[0].lora_index].path)
        warn(msg)
