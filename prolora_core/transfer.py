"""The transfer as one call: plan (:mod:`.plan`) → match (:mod:`.match`) → project and assemble
(:mod:`.assemble`), with config in :mod:`.config` and report types in :mod:`.report`. Many LoRAs
share one pass over the bases; weights are streamed one at a time.

The names below are re-exported so callers can keep importing them from here.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

from .assemble import NameFn, Piece, default_output_name, project_loras
from .cache import BasisCache
from .candidates import suggest_candidates
from .full_bases import FullBases
from .config import DEFAULT_MODE, DEFAULT_THRESHOLD, PAIRINGS, Pairing, ProgressFn, TransferConfig
from .linalg import resolve_device, torch_threads
from .lora import LoraFile
from .match import BasisProvider, ModuleMatch, match_modules
from .plan import Planned, check_fits, plan_by_names, split_blocks
from .report import ModuleReport, RunStats, TransferResult, overall_norm_ratio
from .slices import with_slices
from .weights import WeightSource

__all__ = [
    "DEFAULT_MODE", "DEFAULT_THRESHOLD", "PAIRINGS", "Pairing", "ProgressFn", "TransferConfig", "ModuleReport", "RunStats",
    "TransferResult", "overall_norm_ratio", "Planned", "check_fits", "plan_by_names", "split_blocks", "BasisProvider", "ModuleMatch",
    "match_modules", "NameFn", "Piece", "default_output_name", "project_loras", "transfer",
]


def transfer(
    loras: Sequence[LoraFile],
    plan: Sequence[Planned],
    source: WeightSource,
    target: WeightSource,
    config: TransferConfig,
    cache: BasisCache | None = None,
    progress: ProgressFn | None = None,
    check_interrupt: Callable[[], None] | None = None,
    full_bases: FullBases | None = None,
) -> tuple[list[TransferResult], RunStats]:
    """Check the plan, match the touched source weights, project every LoRA: one pass over the
    bases serves all LoRAs. Source weights that only carry 1-D parts get no basis. A plan may place
    modules on slices of weights (virtual keys, :mod:`.slices`). Skipped modules get their best
    candidate and, under name pairing, the similarity-pairing hint
    (:func:`.candidates.suggest_candidates`). Modes ``casa`` and ``auto`` read the source's full SVDs
    from ``full_bases`` (default: a :class:`.full_bases.FullBases` over ``cache``); their counts join
    the returned stats."""
    source, target = with_slices(source), with_slices(target)
    for p in plan:
        if p.source_key is not None:
            check_fits(loras[p.lora_index], p.module, source.shape(p.source_key), source.label)
    plan = split_blocks(plan)  # block-diagonal modules (kohya split_qkv): each block on its rows
    keys = [p.source_key for p in plan if p.source_key is not None]
    pair_only = set(keys) - {p.source_key for p in plan if p.module.update is not None}
    matches, stats = match_modules(keys, source, target, config, cache, progress, check_interrupt, pair_only)
    t0 = time.perf_counter()
    if full_bases is None and config.mode in ("casa", "auto"):
        full_bases = FullBases(cache)
    before = (full_bases.stats.full_svd_computed, full_bases.stats.full_bases_from_cache) if full_bases is not None else (0, 0)
    results = project_loras(loras, plan, matches, config, check_interrupt, source=source, target=target, progress=progress, full_bases=full_bases)
    if full_bases is not None:
        stats.full_svd_computed += full_bases.stats.full_svd_computed - before[0]
        stats.full_bases_from_cache += full_bases.stats.full_bases_from_cache - before[1]
    provider = BasisProvider(config.basis, resolve_device(config.device), cache)
    with torch_threads(config.threads):
        suggest_candidates(results, matches, source, target, config, provider)
    stats.svd_computed += provider.stats.svd_computed
    stats.bases_from_cache += provider.stats.bases_from_cache
    stats.seconds += time.perf_counter() - t0
    return results, stats
