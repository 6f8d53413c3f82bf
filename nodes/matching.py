"""The glue between ComfyUI objects and the engine's match/project phases (no math here)."""
from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import comfy.lora_convert

from ..prolora_core.cache import DEFAULT_MAX_GB
from ..prolora_core.candidates import suggest_candidates
from ..prolora_core.errors import ProLoRAError
from ..prolora_core.full_bases import FullBases
from ..prolora_core.linalg import matrix_shape, resolve_device
from ..prolora_core.lora import LoraFile, parse_state_dict
from ..prolora_core.modulation import modulation_line
from ..prolora_core.names import name_style
from ..prolora_core.provenance import output_metadata
from ..prolora_core.slices import parse_place
from ..prolora_core.report import GROUPS, SimilarityHint, format_summary
from ..prolora_core.transfer import (
    BasisProvider,
    ModuleMatch,
    ModuleReport,
    Planned,
    TransferConfig,
    TransferResult,
    check_fits,
    match_modules,
    split_blocks,
    project_loras,
)
from .blocks import with_blocks
from .bridge import CLIP, BasisHandle, LoraModel, ReadOnlyDict, check_interrupt, native_module, progress
from .families import check_shapes_can_match


class Verdict(NamedTuple):
    """Match Modules' verdict on a LoRA's modules, and the bases its similarity hint needed."""

    result: TransferResult
    svd_computed: int
    bases_from_cache: int


@dataclass(frozen=True)
class MatchHandle:
    """What **Match Modules** gives: per model part, each source weight's match (target weight, Φ, bases).

    Immutable: ComfyUI caches node outputs and gives the same object to every consumer and to later
    runs, so nodes that need more modules matched (Project LoRA with another LoRA) call
    :meth:`extended`, which returns a new handle and leaves this one as Match Modules returned it.
    """

    source: BasisHandle
    target: BasisHandle
    config: TransferConfig
    matches: Mapping[str, Mapping[str, ModuleMatch]] = field(default_factory=lambda: ReadOnlyDict())
    unmapped: tuple[str, ...] = ()
    svd_computed: int = 0
    bases_from_cache: int = 0
    #: the LoRA given to Match Modules, and each of its modules' (part, source weight key)
    lora: LoraFile | None = None
    planned: Mapping[str, tuple[str, str]] = field(default_factory=lambda: ReadOnlyDict())

    def with_lora(self, lora: LoraFile) -> MatchHandle:
        """A handle that plans ``lora`` on the source model (ComfyUI's key maps) and matches the
        weights it touches; ``self`` is left as it is."""
        plans, unmapped = plan_lora(lora, self.source)
        out = replace(self, lora=lora, unmapped=tuple(unmapped),
                      planned=ReadOnlyDict({p.module.name: (part, p.source_key) for part, plan in plans.items() for p in plan if p.source_key}))
        for part, plan in plans.items():
            keys = [p.source_key for p in plan if p.source_key]
            if part in self.target.parts:
                check_shapes_can_match(self.source.parts[part], self.target.parts[part], keys, self.config.pairing, f"the LoRA's {len(plan)} modules")
            out = out.extended(part, keys)
        return out

    def extended(self, part: str, keys: list[str], pair_only: Collection[str] = ()) -> MatchHandle:
        """A handle that also matches the source weights in ``keys`` not matched yet (``pair_only``:
        by name alone, no basis: weights that only carry 1-D parts); a weight matched that way
        earlier is matched again when it now needs its bases. Returns ``self`` when nothing is new.

        Raises ProLoRAError when ``part`` is touched but the target basis has no such part.
        """
        have = self.matches.get(part, {})
        src, tgt = self.source.parts[part], self.target.parts.get(part)
        todo = [k for k in dict.fromkeys(keys)
                if k not in have or (have[k].basis_free and k not in pair_only and len(src.shape(k)) >= 2)]
        if not todo:
            return self
        if tgt is None:
            raise ProLoRAError(f"the LoRA touches the {part} but the target basis was computed without it (connect a CLIP to Compute Basis)")
        found, stats = match_modules(todo, src, tgt, self.config, self.source.cache(), progress(len(todo)), check_interrupt, pair_only)
        matches = dict(self.matches)
        matches[part] = ReadOnlyDict({**have, **found})
        return replace(self, matches=ReadOnlyDict(matches), svd_computed=self.svd_computed + stats.svd_computed,
                       bases_from_cache=self.bases_from_cache + stats.bases_from_cache)

    def rows(self) -> list[dict[str, Any]]:
        """One row per matched source weight, for reports and the web panel."""
        out = []
        for part, ms in self.matches.items():
            for m in ms.values():
                s = m.similarity
                out.append({
                    "part": part, "source": m.source_key, "target": m.target_key, "k": m.k,
                    "phi_u": None if s is None else round(s.phi_u, 4), "phi_v": None if s is None else round(s.phi_v, 4),
                    "chance": None if s is None else round(max(s.chance_u, s.chance_v), 4),
                    "passes": m.passes(self.config), "repaired": m.repaired, "reason": m.reason or ("ok" if m.passes(self.config) else "below threshold"),
                })
        return out

    def module_reports(self) -> Verdict | None:
        """The match's verdict per LoRA module as a :class:`TransferResult` without tensors (passing
        = would be transferred), with best candidates and the similarity-pairing hint; ``None``
        without a LoRA. Counted by the same :meth:`TransferResult.summary` as a transfer. The bases
        the hint needed are counted in the verdict (the handle itself is immutable)."""
        if self.lora is None:
            return None
        reports = []
        for name, mod in self.lora.modules.items():
            part, key = self.planned.get(name, (None, None))
            m = self.matches.get(part, {}).get(key) if part is not None else None  # type: ignore[arg-type]
            rep = ModuleReport(str(self.lora.path or "<LORA_MODEL>"), name, None, key, None, False, "no base weight", kind=mod.kind)
            if m is not None:
                ok = m.passes(self.config)
                rep.transferred = ok
                rep.reason = ("transferred" if mod.update is not None else "carried over unchanged") if ok else (m.reason or "below threshold")
                rep.target_key, rep.repaired = (m.target_key, m.repaired) if ok else (None, False)
            reports.append(rep)
        result = TransferResult(self.lora, {}, reports)
        provider = BasisProvider(self.config.basis, resolve_device(self.config.device), self.source.cache())
        for part, matches in self.matches.items():
            tgt = self.target.parts.get(part)
            if tgt is None:
                continue
            mine = TransferResult(self.lora, {}, [r for r in reports if self.planned.get(r.source, ("", ""))[0] == part])
            suggest_candidates([mine], matches, self.source.parts[part], tgt, self.config, provider)
            hint = mine.similarity_hint
            if hint is not None:
                old = result.similarity_hint or SimilarityHint(0, 0, 0)
                result.similarity_hint = SimilarityHint(old.placed + hint.placed, old.looked_at + hint.looked_at, old.skipped + hint.skipped)
        return Verdict(result, provider.stats.svd_computed, provider.stats.bases_from_cache)

    def summary(self, verdict: Verdict | None = None) -> str:
        """Readable summary; with a LoRA, its modules' groups add up to the LoRA's module count."""
        rows = self.rows()
        passing = sum(r["passes"] for r in rows)
        lines = [
            f"ProLoRA match: {self.source.label} → {self.target.label}",
            f"pairing={self.config.pairing} threshold={self.config.threshold:g} subspace rank={self.config.subspace_rank or 'auto min(64, d/4)'}",
        ]
        if verdict is None:
            verdict = self.module_reports()
        computed, cached = self.svd_computed, self.bases_from_cache
        if verdict is not None:
            computed, cached = computed + verdict.svd_computed, cached + verdict.bases_from_cache
            te_reason = "no weight in the source model's text encoder" if CLIP in self.source.parts else "connect a CLIP to Compute Basis to transfer them"
            result = verdict.result
            lines += format_summary(result.lora.path.name if result.lora.path else "LoRA", result.summary(), self.config.threshold, te_reason,
                                    labels={"transferred": "pass (would be transferred)", "carried_over": "carried over unchanged (1-D parts only)"})
        else:
            lines.append(f"weights matched: {len(rows)}, passing the threshold: {passing}, re-paired: {sum(r['repaired'] for r in rows)}")
        lines.append(f"bases computed: {computed}, from cache: {cached}")
        for label, handle in (("source", self.source), ("target", self.target)):
            if any(handle.patched.values()):
                lines.append(f"note: the {label} model carries patches on {handle.patched} weights (merges or LoRAs); bases are of the patched weights")
        if self.unmapped:
            lines.append(f"LoRA modules with no weight in the source model ({len(self.unmapped)}): {', '.join(self.unmapped[:8])}")
        phis = [min(r["phi_u"], r["phi_v"]) for r in rows if r["phi_u"] is not None]
        if phis:
            lines.append(f"Φ (min of U/V): min {min(phis):.2f}, median {sorted(phis)[len(phis) // 2]:.2f}, max {max(phis):.2f}")
        group = modulation_line((r["source"], None if r["phi_u"] is None else min(r["phi_u"], r["phi_v"]), r["passes"], r["target"] is not None)
                                for r in rows)
        if group:
            lines.append(group)
        return "\n".join(lines)

    def panel(self, verdict: Verdict | None = None) -> dict[str, Any]:
        """What the web panel of Match Modules shows (``ui["prolora_match"][0]``); rows carry their
        block and model-order position (:func:`.blocks.with_blocks`)."""
        rows = with_blocks(self.rows())
        s = verdict.result.summary() if verdict is not None else None
        return {"threshold": self.config.threshold, "pairing": self.config.pairing, "modules": len(rows), "passing": sum(r["passes"] for r in rows),
                "rows": rows, "unmapped": list(self.unmapped), "lora_modules": None if s is None else s["modules"],
                "groups": None if s is None else {GROUPS[k]: n for k, n in s["groups"].items() if n},
                "similarity_may_place": None if s is None else s["similarity_may_place"]}


#: Why a module is not transferred when ComfyUI's key maps do not know its name.
UNMAPPED = "no entry in ComfyUI's LoRA key map for this model: ComfyUI would not apply it either"


def plan_lora(lora: LoraFile, handle: BasisHandle) -> tuple[dict[str, list[Planned]], list[str]]:
    """Per model part, the LoRA's modules placed on the source model's weights, or on slices of
    fused weights (virtual keys), through ComfyUI's own key maps (``model_lora_keys_unet`` /
    ``_clip``), so a module lands where ``comfy.lora.load_lora`` applies it; the second value names
    the modules the key maps do not know (ComfyUI skips them)."""
    plans: dict[str, list[Planned]] = {}
    unmapped: list[str] = []
    for mod in lora.modules.values():
        loc = handle.locate(mod.name)
        if loc is None:
            unmapped.append(mod.name)
            continue
        part, key = loc
        check_fits(lora, mod, handle.parts[part].shape(key), handle.label)
        plans.setdefault(part, []).append(Planned(0, mod, key))
    plans = {part: split_blocks(plan) for part, plan in plans.items()}  # kohya split_qkv: each block on its rows
    if not plans:
        shown = ", ".join(sorted(lora.modules)[:3])
        raise ProLoRAError(f"none of the LoRA's {len(lora.modules)} modules maps onto the source model ({handle.label}); "
                           f"is it a LoRA for another base model? e.g. {shown}", file=lora.path or "<LORA_MODEL>")
    return plans, unmapped


def parse_lora_model(lora: dict, label: str = "<LORA_MODEL>") -> LoraFile:
    """A ``LORA_MODEL`` as the engine's :class:`LoraFile`, after ComfyUI's own format conversion
    (``comfy.lora_convert.convert_lora``, as core ``load_lora_for_models`` does).

    A :class:`LoraModel` (what the pack's Load LoRA and Project LoRA give) is parsed once and the
    result kept on it (:meth:`LoraModel.parsed`: a changed tensor parses again); a plain ``dict``
    (e.g. from core training nodes) is parsed on every call.
    """
    if isinstance(lora, LoraModel):
        return lora.parsed(lambda lm: _parse(lm, label))
    return _parse(lora, label)


def _parse(lora: dict, label: str) -> LoraFile:
    meta = getattr(lora, "metadata", None)
    src = getattr(lora, "source_file", None)
    return parse_state_dict(comfy.lora_convert.convert_lora(dict(lora)), Path(src) if src else Path(label), meta)


def unused_lines(lora: LoraFile, unmapped: Collection[str], limit: int = 12) -> list[str]:
    """Report lines naming what of the LoRA is not used, with the reason: keys no module uses and
    modules with no weight in the source model (empty when everything is used)."""
    items = [f"{k}: {why}" for k, why in lora.unused.items()] + [f"{m}.*: {UNMAPPED}" for m in sorted(unmapped)]
    if not items:
        return []
    shown = items[:limit] + ([f"… and {len(items) - limit} more"] if len(items) > limit else [])
    return [f"not used ({len(lora.unused)} tensors, {len(unmapped)} modules):", *(f"  {line}" for line in shown)]


def all_weight_keys(handle: BasisHandle, part: str) -> list[str]:
    w = handle.parts[part]
    return [k for k in w.keys() if k.endswith(".weight") and len(w.shape(k)) in (2, 4) and min(matrix_shape(w.shape(k))) > 1]


def project_lora_model(lora_in: dict, match: MatchHandle, config: TransferConfig) -> tuple[LoraModel, list[TransferResult]]:
    """Project a ``LORA_MODEL`` with a match: native ComfyUI keys out, metadata and save names kept."""
    lora = parse_lora_model(lora_in)
    plans, unmapped = plan_lora(lora, match.source)
    tensors: dict = {}
    save_names: dict[str, str] = {}
    results: list[TransferResult] = []
    # mode casa / auto: the source's full SVDs from the basis cache (at most its default size limit written per run)
    full = FullBases(match.source.cache(), disk_max_bytes=int(DEFAULT_MAX_GB * 2**30))
    for part, plan in plans.items():
        keys = [p.source_key for p in plan if p.source_key]
        match = match.extended(part, keys, set(keys) - {p.source_key for p in plan if p.module.update is not None})
        inverse = _inverse(match.target.key_maps.get(part, {}))

        def name(p: Planned, m: ModuleMatch, part: str = part, inverse: dict = inverse) -> str:
            if parse_place(m.target_key) is not None:  # type: ignore[arg-type]  # a slice has no native name: the LoRA's own
                save_names[p.module.name] = p.module.name
                return p.module.name
            native = native_module(part, m.target_key)  # type: ignore[arg-type]
            save_names[native] = p.module.name if not m.repaired else _same_style(p.module.name, inverse.get(m.target_key, []), native)  # type: ignore[arg-type]
            return native

        (res,) = project_loras([lora], plan, match.matches[part], config, check_interrupt, name,
                               source=match.source.parts[part], target=match.target.parts.get(part), full_bases=full)
        tensors.update(res.tensors)
        results.append(res)
    meta = output_metadata(_merged(lora, tensors, results), match.source.label, match.target.label, config, match.target.family)
    meta["prolora.unmapped_modules"] = str(len(unmapped))
    return LoraModel(tensors, meta, save_names, None, unused_lines(lora, unmapped),
                     projection=tuple(m for r in results for m in r.modules)), results


def _merged(lora: LoraFile, tensors: dict, results: list[TransferResult]) -> TransferResult:
    """One result over the model parts; the energy dropped is weighted by each part's transferred energy."""
    dropped = None
    parts = [(r.energy_dropped, sum((m.transferred_norm or 0.0) ** 2 for m in r.modules)) for r in results if r.energy_dropped is not None]
    if parts:
        total = sum(w for _, w in parts)
        dropped = sum(e * w for e, w in parts) / total if total > 0 else 0.0
    return TransferResult(lora, tensors, [m for r in results for m in r.modules], dropped)


def _inverse(key_map: dict[str, str]) -> dict[str, list[str]]:
    inv: dict[str, list[str]] = {}
    for lora_key, weight_key in key_map.items():
        inv.setdefault(weight_key, []).append(lora_key)
    return inv


def _same_style(original: str, candidates: list[str], fallback: str) -> str:
    """The candidate LoRA name of the target weight spelled like ``original`` (kohya in, kohya out)."""
    style = name_style(original)
    for c in candidates:
        cs = name_style(c)
        if cs.prefix == style.prefix and cs.underscored == style.underscored:
            return c
    return fallback
