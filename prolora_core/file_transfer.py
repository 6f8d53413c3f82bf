"""File to file: source and target base files (safetensors or GGUF) and LoRA files in, one
transferred LoRA file per LoRA and target out. The one path behind the CLI's ``transfer`` command
and the Transfer LoRA (files) node; both only turn their inputs into the arguments here and show
what comes back.

Steps: open the weights (:func:`.weights.open_weights`, streamed per key) → read the LoRAs → place
each module (ComfyUI's key map for the detected model through ``detect``, else ``<module>.weight``
names, as :func:`.plan.plan_by_names` does) → refuse shapes that cannot match with one message
(:mod:`.shapes`) → per target :func:`.transfer.transfer` (the source's bases are computed once for
all targets: from the basis cache, or from memory without one) → metadata
(:func:`.provenance.output_metadata`) → atomic save (temp file, then rename) → basis cache limit.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .basis import Basis
from .cache import BasisCache
from .config import ProgressFn, TransferConfig
from .errors import ProLoRAError
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
    """The bases computed in this run, kept in memory and served by content (what :class:`.cache.BasisCache`
    serves from disk): with several targets and the disk cache off, the source's bases are computed
    once, not once per target."""

    def __init__(self) -> None:
        self._bases: dict[tuple[str, tuple[int, ...]], Basis] = {}

    def load(self, content_key: str, k: int, shape: tuple[int, ...]) -> Basis | None:
        b = self._bases.get((content_key, tuple(shape)))
        return b.truncate(k) if b is not None and b.k >= k else None

    def store(self, content_key: str, basis: Basis) -> None:
        self._bases[(content_key, tuple(basis.shape))] = basis


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
    # the others go on; a lone LoRA's error is raised. ``kept``: each placed LoRA's index in ``lora_paths``.
    failed: list[tuple[Path, ProLoRAError]] = []

    def left_out(i: int, e: ProLoRAError) -> None:
        if len(lora_paths) == 1:
            raise e
        failed.append((Path(lora_paths[i]), e))
        warn(f"{e} — this LoRA is left out; the others go on")

    read: list[tuple[int, LoraFile]] = []
    for i, path in enumerate(lora_paths):
        try:
            read.append((i, read_lora(path)))
        except ProLoRAError as e:
            left_out(i, e)
    for _, lora in read:
        if lora.unknown_keys:
            warn(f"{lora.path}: {len(lora.unknown_keys)} keys are not used: " + _first([f"{k} ({lora.unused[k]})" for k in lora.unknown_keys], listed_in))
    if found is not None:
        naming, locate = f"ComfyUI's key map for {found.kind}", found.key_map.get
        unplaced = (f"maps onto the source model {describe(source)} through ComfyUI's key map", ": is it a LoRA for another base model?")
    else:
        naming, locate = "weight names", BaseIndex(source.keys()).resolve  # as plan.plan_by_names places them
        unplaced = (f"has a weight in the source base {source.label}", "")
    kept: list[int] = []
    loras: list[LoraFile] = []
    plan: list[Planned] = []
    for i, lora in read:
        mine = [Planned(len(loras), mod, locate(mod.name)) for mod in lora.modules.values()]
        if mine and all(p.source_key is None for p in mine):
            left_out(i, ProLoRAError(f"none of the LoRA's {len(mine)} modules {unplaced[0]} (e.g. '{mine[0].module.name}'){unplaced[1]}",
                                     file=lora.path or "<LoRA>"))
            continue
        kept.append(i)
        loras.append(lora)
        plan += mine
    if not loras:
        raise failed[0][1] if failed else ProLoRAError("no LoRA given")
    te_reason = NO_TEXT_ENCODER if found is not None else TEXT_ENCODER_REASON
    _not_mapped(plan, loras, source.label, config.strict, warn, listed_in, te_reason)
    sliced = with_slices(source)
    for i, lora in enumerate(loras):
        placed = [(p.module.name, p.module.update.matrix_shape, p.source_key) for p in plan
                  if p.lora_index == i and p.source_key is not None and p.module.update is not None and len(sliced.shape(p.source_key)) >= 2]
        check_lora_fits_somewhere(placed, sliced, lora.path or "<LoRA>", describe)
    keys = [p.source_key for p in plan if p.source_key is not None]
    n_modules = sum(p.source_key is not None for p in plan)
    for t in targets:
        check_shapes_can_match(sliced, with_slices(t), keys, config.pairing, f"the LoRA's {n_modules} modules" if len(loras) == 1
                               else f"the {n_modules} modules of the {len(loras)} LoRAs", describe, absent_ok=found is None)
    bases = cache if cache is not None else (MemoryBases() if len(targets) > 1 else None)
    runs: list[TargetRun] = []
    lines: list[str] = []

    def said(line: str) -> None:
        lines.append(line)
        say(line)

    for ti, target in enumerate(targets):
        results, stats = transfer(loras, plan, source, target, config, bases, progress, check_interrupt)  # type: ignore[arg-type]
        target.save_memo()
        said(f"ProLoRA {config.mode}, pairing {config.pairing}: {source.label} → {target.label}; bases computed {stats.svd_computed}, "
             f"from cache {stats.bases_from_cache}; CPU threads {config.threads}")
        target_model = family(target) if found is not None else None
        kind = target_model.kind if target_model is not None else None  # names the target in the base-model metadata fields
        written: list[Path | None] = []
        for li, result in enumerate(results):
            summary = result.summary()
            for line in format_summary(result.lora.path.name if result.lora.path else f"LoRA {li + 1}", summary, config.threshold,
                                       *(("the source file carries no such text-encoder weight",) if found is not None else ())):
                said(line)
            if summary["transferred"] == 0:
                said("  nothing written")
                warn(f"{result.lora.path}: no module could be transferred to {target.label}; nothing written for it")
                written.append(None)
                continue
            out = out_path(kept[li], ti)
            meta = output_metadata(result, source.label, target.label, config, kind)
            atomic_save(result.tensors, out, meta)
            written.append(out)
            line = on_saved(out) if on_saved is not None else None
            if line:
                said(line)
            skipped = [m for m in result.modules if not m.transferred and m.source_key is not None]
            if skipped:
                why = [f"{m.source} ({m.reason}" + (f"; best candidate {m.candidate}, Φ {m.candidate_phi:.2f}"
                                                    if m.candidate is not None and m.candidate_phi is not None else "") + ")" for m in skipped]
                warn(f"{len(skipped)} modules not transferred to {target.label}: " + _first(why, listed_in))
        runs.append(TargetRun(target, results, stats, written))
    source.save_memo()
    evicted = cache.evict(cache_max_bytes) if cache is not None and cache_max_bytes is not None else 0
    return FilesRun(source, loras, runs, naming, quantized, lines, evicted, failed)


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
