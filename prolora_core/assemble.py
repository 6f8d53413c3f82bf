"""Project (the paper's third step) and assemble: every planned LoRA module projected on its match,
then the output tensors of each LoRA written in the input's layout.

Each update projects itself (:meth:`.adapters.Adapter.project`): LoRA/LoCon factors in factored
form; LoHa and LoKr as their dense ``ΔW``, re-factored into a LoRA; a 2-D/4-D ``.diff`` densely,
written back as a ``.diff``. A DoRA magnitude follows the ratio rule; 1-D parts are carried over
unchanged (a module made only of them needs no basis). In ``copy`` mode every module is written back
as it came (:meth:`.adapters.Adapter.copied`; LoRA factors as kohya factors, scale kept). In
``casa`` mode (:mod:`.casa`) each module reads its source and target weights, one module at a time,
and the source weight's full SVD from :class:`.full_bases.FullBases` (memory, basis cache, or computed);
the update is written back by :meth:`.adapters.Adapter.from_dense` with the output rank (default:
the input LoRA's; a ``.diff`` stays dense). In ``auto`` mode (:mod:`.auto`) a first pass reads the
paired weights of every module that passes the Φ filter and picks ``casa``, ``copy`` or nothing for
the whole LoRA; each module's report gives the choice and the numbers.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from . import auto
from .adapters import Module, Projected, Refactored, Update, dora_magnitude
from .casa import casa_update
from .config import ProgressFn, TransferConfig
from .errors import ProLoRAError
from .full_bases import FullBases
from .linalg import cpu_fallback, linalg_device, resolve_device, torch_threads
from .lora import LoraFile, module_tensors
from .match import ModuleMatch
from .names import BaseIndex, name_style
from .plan import Planned
from .projection import Factors, recompress
from .report import ModuleReport, TransferResult
from .slices import with_slices
from .weights import WeightSource

NameFn = Callable[[Planned, ModuleMatch], str]


def default_output_name(p: Planned, match: ModuleMatch) -> str:
    """The input's own module name, or the target module's name in the input's style when re-paired."""
    if not match.repaired:
        return p.module.name
    return name_style(p.module.name).encode(BaseIndex([match.target_key]).bare_name(match.target_key))  # type: ignore[list-item,arg-type]


@dataclass
class Piece:
    """One module's output before it is written: LoRA factors (written in ``layout``: the input
    LoRA module's, or a base weight's shape) and other tensors by suffix (``.diff``, ``.dora_scale``,
    carried 1-D parts, or a module copied as it came)."""

    report: ModuleReport
    factors: Factors | None = None
    layout: tuple[int, ...] = ()
    tensors: dict[str, Tensor] = field(default_factory=dict)
    energy: tuple[float, float] | None = None  # (kept, total) Σσ² of a re-factored update

    @property
    def summable(self) -> bool:
        """Plain LoRA factors and nothing else: pieces like this on one output module are summed."""
        return self.factors is not None and not self.tensors


Weights = tuple[WeightSource | None, WeightSource | None]


def project_loras(loras: Sequence[LoraFile], plan: Sequence[Planned], matches: dict[str, ModuleMatch], config: TransferConfig,
                  check_interrupt: Callable[[], None] | None = None, output_name: NameFn = default_output_name,
                  source: WeightSource | None = None, target: WeightSource | None = None,
                  progress: ProgressFn | None = None, full_bases: FullBases | None = None) -> list[TransferResult]:
    """Project every planned LoRA module with its match; modules that do not pass are reported.

    ``output_name`` names each output module (default: as in the input). Plain LoRA updates that
    land on the same output module are summed. ``source`` and ``target`` are needed by DoRA
    modules only (the ratio rule reads both weights). A CUDA out-of-memory error in one module
    redoes that module on the CPU, with a warning. ``progress(i, len(plan), what)`` is called
    before each planned module. ``full_bases`` serves the source's full SVDs in modes ``casa`` and
    ``auto`` (:class:`.full_bases.FullBases`; default: a fresh one with no disk cache, so each weight's
    SVD is computed once per call)."""
    if full_bases is None and config.mode in ("casa", "auto"):
        full_bases = FullBases()
    source, target = (None if w is None else with_slices(w) for w in (source, target))  # DoRA on a slice reads the slice
    reports: list[list[ModuleReport]] = [[] for _ in loras]
    pieces: list[dict[str, list[Piece]]] = [{} for _ in loras]
    with torch_threads(config.threads):
        departures, paired = _departures(loras, plan, matches, config, (source, target)) if config.mode == "auto" else ({}, {})
        choices = {i: auto.choose(list(d.values()), paired[i]) for i, d in departures.items()}
        for step, p in enumerate(plan):
            if check_interrupt is not None:
                check_interrupt()
            lora, mod = loras[p.lora_index], p.module
            if progress is not None:
                progress(step, len(plan), f"projecting {lora.path.name if lora.path else 'the LoRA'}: {mod.name}")
            rep = ModuleReport(str(lora.path or "<LoRA>"), mod.name, None, p.source_key, None, False, "no base weight",
                               source_norm=mod.source_norm(), kind=mod.kind)
            reports[p.lora_index].append(rep)
            match = matches.get(p.source_key) if p.source_key is not None else None
            if match is None:
                continue
            rep.reason = match.reason
            if match.similarity is not None:
                s = match.similarity
                rep.similarity_u, rep.similarity_v, rep.chance_u, rep.chance_v, rep.subspace_rank = s.phi_u, s.phi_v, s.chance_u, s.chance_v, match.k
                rep.basis_uncertainty = match.uncertainty
            if match.target_key is None:
                continue
            mode, why = config.mode, "transferred"
            if mode == "auto" and mod.update is not None:  # one choice per LoRA (auto.py)
                choice, median = choices[p.lora_index]
                rel = departures[p.lora_index].get(p.source_key)  # type: ignore[arg-type]
                why = auto.reason(choice, median, rel, len(departures[p.lora_index]), paired[p.lora_index])
                if choice == "none":
                    rep.reason = why
                    continue
                mode = choice
                if choice == "copy":  # the update as it came on its paired module, Φ or not
                    match = dataclasses.replace(match, basis_free=True)
            if mod.update is not None and not match.passes(config):  # Φ filters projections; 1-D parts are carried
                rep.reason = "below threshold"
                continue
            piece = cpu_fallback(f"the projection of {mod.name}",
                                 lambda dev: _transfer_module(rep, mod, match, config, lora.dtype, (source, target), dev, mode, full_bases))  # noqa: B023
            rep.transferred, rep.reason = True, why if mod.update is not None else "carried over unchanged"
            rep.target_key, rep.target, rep.repaired = match.target_key, BaseIndex([match.target_key]).bare_name(match.target_key), match.repaired
            pieces[p.lora_index].setdefault(output_name(p, match), []).append(piece)
        results = []
        for i, lora in enumerate(loras):
            tensors, dropped = _assemble(lora, pieces[i], config)
            results.append(TransferResult(lora, tensors, reports[i], dropped))
    return results


def _departures(loras: Sequence[LoraFile], plan: Sequence[Planned], matches: dict[str, ModuleMatch], config: TransferConfig,
                weights: Weights) -> tuple[dict[int, dict[str, float]], dict[int, int]]:
    """Mode ``auto``'s first pass, per LoRA (index): the relative departure ``‖W_t − W_s‖ / ‖W_s‖`` of
    every module with an update that passes the Φ filter, by source key (:func:`.auto.relative_departure`),
    and the number of its modules with an update and a paired target weight (passing or not)."""
    source, target = weights
    out: dict[int, dict[str, float]] = {i: {} for i in range(len(loras))}
    paired = dict.fromkeys(range(len(loras)), 0)
    for p in plan:
        match = matches.get(p.source_key) if p.source_key is not None else None
        if match is None or match.target_key is None or p.module.update is None:
            continue
        paired[p.lora_index] += 1
        if not match.passes(config):
            continue
        if source is None or target is None:
            raise ProLoRAError("mode auto needs the source and target weights (project_loras(..., source=, target=))", key=p.module.name)
        out[p.lora_index][p.source_key] = auto.relative_departure(source.get(match.source_key), target.get(match.target_key))  # type: ignore[arg-type]
    return out, paired


def _transfer_module(rep: ModuleReport, mod: Module, match: ModuleMatch, config: TransferConfig, lora_dtype: torch.dtype,
                     weights: Weights, device: torch.device | None, mode: str | None = None, full_bases: FullBases | None = None) -> Piece:
    """One module's output on ``match`` (bases moved to ``device`` when given) in ``mode`` (default:
    the config's; mode ``auto`` passes its choice); sets the report's transferred norm and energy kept."""
    mode = mode or config.mode
    keep = (lambda t: t) if config.save_dtype is None else (lambda t: t.to(config.save_dtype))
    piece = Piece(rep, tensors={s: keep(t) for s, t in mod.carried.items()})
    u = mod.update
    if u is None:
        return piece
    copy = mode == "copy"
    stored = u.copied() if copy else None
    if stored is not None:  # written back exactly as it came
        piece.tensors.update({s: keep(t) for s, t in stored.items()})
        if u.alpha is not None:
            piece.tensors[".alpha"] = torch.tensor(u.alpha, dtype=torch.float32)
        if mod.dora_scale is not None:
            piece.tensors[".dora_scale"] = keep(mod.dora_scale)
        rep.transferred_norm = rep.source_norm
        return piece
    bs, bt = match.source_basis, match.target_basis
    if device is not None and bs is not None and bt is not None:
        bs, bt = bs.to(device), bt.to(device)
    out_dtype = config.save_dtype or lora_dtype
    out = _casa(mod, u, match, config, weights, device, full_bases) if mode == "casa" else u.project(bs, bt, mode, config.out_rank)  # type: ignore[arg-type]
    piece.factors, piece.layout, piece.energy = out.factors, out.layout, out.energy
    diff, norm = out.diff, out.norm
    if out.energy_kept is not None:
        rep.energy_kept = out.energy_kept
    if config.rescale_to_source_norm and norm > 0:
        ratio = rep.source_norm / norm
        if piece.factors is not None:
            piece.factors = Factors(piece.factors.up, piece.factors.down, piece.factors.scale * ratio)
        diff = diff * ratio if diff is not None else None
        norm = rep.source_norm
    if diff is not None:
        piece.tensors[".diff"] = diff.to(out_dtype)
    if mod.dora_scale is not None:
        piece.tensors[".dora_scale"] = keep(mod.dora_scale) if copy else _dora(mod, match, weights).to(out_dtype)
    rep.transferred_norm = norm
    return piece


def _casa(mod: Module, u: Update, match: ModuleMatch, config: TransferConfig, weights: Weights, device: torch.device | None,
          full_bases: FullBases | None = None) -> Projected:
    """Mode ``casa`` for one module, written back in the update's own output form; the source's full
    SVD from ``full_bases`` when given (else computed by :func:`.casa.casa_update`)."""
    source, target = weights
    if source is None or target is None:
        raise ProLoRAError("mode casa needs the source and target weights (project_loras(..., source=, target=))", key=mod.name)
    wt = target.get(match.target_key)  # type: ignore[arg-type]
    rank = config.out_rank or u.default_rank
    dev = linalg_device(device or resolve_device(config.device))
    svd = full_bases.get(source, match.source_key, dev) if full_bases is not None else None  # type: ignore[arg-type]
    res = casa_update(u.dense(), source.get(match.source_key), wt, rank, config.casa, dev, svd)  # type: ignore[arg-type]
    total = float(res.delta.double().square().sum())
    return u.from_dense(res.delta, tuple(wt.shape), rank, total, Refactored(res.factors, res.energy_kept))


def _dora(mod: Module, match: ModuleMatch, weights: Weights) -> Tensor:
    source, target = weights
    if source is None or target is None:
        raise ProLoRAError("DoRA modules need the source and target weights (project_loras(..., source=, target=))", key=mod.dora_key)
    return dora_magnitude(mod.dora_scale, source.get(match.source_key), target.get(match.target_key))  # type: ignore[arg-type]


def _assemble(lora: LoraFile, pieces: dict[str, list[Piece]], config: TransferConfig) -> tuple[dict[str, Tensor], float | None]:
    """Output tensors and the share of energy dropped by re-factoring/re-compression (``None`` when
    nothing was). Plain LoRA pieces on one output module are summed (factors concatenated); other
    pieces cannot be, so the first stays and the others are reported as not transferred."""
    tensors: dict[str, Tensor] = {}
    kept = total = 0.0
    measured = config.out_rank is not None
    dtype = config.save_dtype or lora.dtype
    for name, parts in pieces.items():
        if len(parts) > 1 and not all(p.summable for p in parts):
            for p in parts[1:]:
                p.report.transferred, p.report.transferred_norm, p.report.target, p.report.target_key = False, None, None, None
                p.report.reason = f"another module already landed on {name}; DoRA, diff and 1-D parts cannot be summed"
            parts = parts[:1]
        for p in parts:
            tensors.update({name + suffix: t for suffix, t in p.tensors.items()})
        factors = [p.factors for p in parts if p.factors is not None]
        if not factors:
            continue
        f = factors[0] if len(factors) == 1 else Factors(torch.cat([p.up * p.scale for p in factors], dim=1), torch.cat([p.down for p in factors], dim=0), 1.0)
        if config.out_rank is not None and config.out_rank < f.rank:
            norm2 = f.frobenius_norm() ** 2
            rc = recompress(f, config.out_rank)
            total += norm2
            kept += norm2 * (1.0 - rc.energy_dropped)
            for p in parts:
                p.report.energy_kept = 1.0 - rc.energy_dropped
            f = rc.factors
        else:
            for p in parts:
                if p.energy is not None:
                    kept, total, measured = kept + p.energy[0], total + p.energy[1], True
        tensors.update(module_tensors(name, f, parts[0].layout, dtype))
    dropped = (1.0 - kept / total) if total > 0 else (0.0 if measured else None)
    return tensors, dropped
