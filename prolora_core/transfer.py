"""The transfer itself: plan which base weight each LoRA module sits on, then per source weight
compute (or load) the bases once, match the target module, filter by Φ and project every LoRA's
module on it. Many LoRAs share one pass over the bases; weights are streamed one at a time.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor

from .basis import Basis, BasisSettings, clamp_rank, compute_basis, default_rank
from .cache import BasisCache
from .errors import ProLoRAError
from .lora import LoraFile, LoraModule, module_tensors
from .names import BaseIndex, name_style
from .linalg import all_finite, matrix_shape, resolve_device
from .projection import MODES, Factors, Mode, project, recompress
from .similarity import Similarity, basis_similarity
from .weights import WeightSource

Pairing = Literal["name", "similarity"]
PAIRINGS: tuple[Pairing, ...] = ("name", "similarity")
#: Defaults (see README, "Choosing the defaults").
DEFAULT_MODE: Mode = "prolora-full"
DEFAULT_THRESHOLD = 0.8


@dataclass(frozen=True)
class TransferConfig:
    """What to transfer and how. ``subspace_rank=None`` means the default rule (:func:`default_rank`)."""

    mode: Mode = DEFAULT_MODE
    subspace_rank: int | None = None
    threshold: float = DEFAULT_THRESHOLD
    pairing: Pairing = "name"
    out_rank: int | None = None
    rescale_to_source_norm: bool = False
    strict: bool = False
    device: str = "auto"
    basis: BasisSettings = field(default_factory=BasisSettings)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ProLoRAError(f"unknown mode '{self.mode}'; choose one of {', '.join(MODES)}")
        if self.pairing not in PAIRINGS:
            raise ProLoRAError(f"unknown pairing '{self.pairing}'; choose name or similarity")
        if not (0.0 <= self.threshold <= 1.0):
            raise ProLoRAError(f"threshold must lie in [0, 1], got {self.threshold}")
        if self.subspace_rank is not None and self.subspace_rank <= 0:
            raise ProLoRAError(f"subspace rank must be positive, got {self.subspace_rank}")
        if self.out_rank is not None and self.out_rank <= 0:
            raise ProLoRAError(f"output rank must be positive, got {self.out_rank}")

    def rank_for(self, m: int, n: int) -> int:
        return clamp_rank(self.subspace_rank, m, n) if self.subspace_rank is not None else default_rank(m, n)


@dataclass
class ModuleReport:
    """One LoRA module's fate. Norms are Frobenius norms of the dense ``ΔW`` (scale included)."""

    lora: str
    source: str
    target: str | None
    source_key: str | None
    target_key: str | None
    transferred: bool
    reason: str
    similarity_u: float | None = None
    similarity_v: float | None = None
    chance_u: float | None = None
    chance_v: float | None = None
    subspace_rank: int | None = None
    source_norm: float = 0.0
    transferred_norm: float | None = None
    repaired: bool = False

    @property
    def norm_ratio(self) -> float | None:
        if self.transferred_norm is None or self.source_norm == 0:
            return None
        return self.transferred_norm / self.source_norm

    def as_dict(self) -> dict:
        d = asdict(self)
        d["norm_ratio"] = self.norm_ratio
        return d


@dataclass
class TransferResult:
    """The output of one LoRA: tensors to save (kohya-dotted) and the per-module report."""

    lora: LoraFile
    tensors: dict[str, Tensor]
    modules: list[ModuleReport]
    energy_dropped: float | None = None

    def summary(self) -> dict:
        done = [m for m in self.modules if m.transferred]
        src = sum(m.source_norm**2 for m in done) ** 0.5
        out = sum((m.transferred_norm or 0.0) ** 2 for m in done) ** 0.5
        return {
            "modules": len(self.modules),
            "transferred": len(done),
            "below_threshold": sum(m.reason == "below threshold" for m in self.modules),
            "no_base_weight": sum(m.source_key is None for m in self.modules),
            "not_in_target": sum(m.reason.startswith("target") for m in self.modules),
            "repaired": sum(m.repaired for m in self.modules),
            "norm_ratio": (out / src) if src > 0 else None,
            "energy_dropped": self.energy_dropped,
            "output_modules": sum(k.endswith(".lora_down.weight") for k in self.tensors),
        }


@dataclass
class RunStats:
    svd_computed: int = 0
    bases_from_cache: int = 0
    seconds: float = 0.0
    worst_subspace_change: float = 0.0


ProgressFn = Callable[[int, int, str], None]


class BasisProvider:
    """Bases of weights from a :class:`WeightSource`, through the cache when there is one."""

    def __init__(self, settings: BasisSettings, device: torch.device, cache: BasisCache | None = None) -> None:
        self.settings = settings
        self.device = device
        self.cache = cache
        self.stats = RunStats()

    def get(self, source: WeightSource, key: str, k: int) -> Basis:
        shape = source.shape(key)
        ck = source.content_key(key) if self.cache is not None else ""
        if self.cache is not None:
            hit = self.cache.load(ck, k, shape)
            if hit is not None:
                self.stats.bases_from_cache += 1
                return hit.to(self.device)
        w = source.get(key)
        if not all_finite(w):
            # The full path when the source has one: source and target are often both "model.safetensors".
            raise ProLoRAError("base weight contains NaN or Inf values", file=getattr(source, "path", None) or source.label, key=key)
        basis = compute_basis(w, k, self.settings, self.device)
        self.stats.svd_computed += 1
        self.stats.worst_subspace_change = max(self.stats.worst_subspace_change, basis.subspace_change)
        if self.cache is not None:
            self.cache.store(ck, basis)
        return basis


@dataclass(frozen=True)
class Planned:
    """A LoRA module placed on a source weight (``source_key=None``: no base weight found)."""

    lora_index: int
    module: LoraModule
    source_key: str | None


def plan_by_names(loras: Sequence[LoraFile], source: WeightSource) -> list[Planned]:
    """Place each LoRA module on ``<module>.weight`` of the source file (prefixes, kohya underscores)."""
    index = BaseIndex(source.keys())
    plan = [Planned(i, mod, index.resolve(mod.name)) for i, lora in enumerate(loras) for mod in lora.modules.values()]
    for i, lora in enumerate(loras):
        mine = [p for p in plan if p.lora_index == i]
        if mine and all(p.source_key is None for p in mine):
            raise ProLoRAError(f"none of the LoRA's {len(mine)} modules has a weight in the source base {source.label} (e.g. '{mine[0].module.name}')",
                               file=lora.path or "<LoRA>")
    return plan


def check_fits(lora: LoraFile, mod: LoraModule, weight_shape: tuple[int, ...], base_label: str) -> None:
    """Refuse a LoRA module whose shape does not fit its base weight, saying why."""
    where = lora.path or "<LoRA>"
    if mod.is_conv and len(weight_shape) != 4:
        raise ProLoRAError(f"conv LoRA {list(mod.down.shape)} on a linear weight {list(weight_shape)} of {base_label}", file=where, key=mod.down_key)
    if not mod.is_conv and len(weight_shape) == 4 and tuple(weight_shape[2:]) != (1, 1):
        raise ProLoRAError(f"linear LoRA on a conv weight {list(weight_shape)} of {base_label}", file=where, key=mod.down_key)
    if mod.matrix_shape != matrix_shape(weight_shape):
        raise ProLoRAError(
            f"LoRA update is {mod.matrix_shape[0]}×{mod.matrix_shape[1]} but the weight in {base_label} is {list(weight_shape)}: "
            "this looks like a LoRA for another base model", file=where, key=mod.up_key)
    if mod.rank > min(mod.matrix_shape):
        raise ProLoRAError(f"rank {mod.rank} is larger than the weight allows (min of {mod.matrix_shape})", file=where, key=mod.down_key)


@dataclass
class ModuleMatch:
    """Where one source weight goes: its target weight, Φ, and the bases the projection needs."""

    source_key: str
    target_key: str | None
    name_key: str | None  # the target weight of the same name, when there is one
    k: int
    similarity: Similarity | None = None
    source_basis: Basis | None = None
    target_basis: Basis | None = None
    reason: str = ""

    @property
    def repaired(self) -> bool:
        return self.target_key is not None and self.target_key != self.name_key

    def passes(self, config: "TransferConfig") -> bool:
        if self.target_key is None:
            return False
        return config.mode == "copy" or (self.similarity is not None and self.similarity.passes(config.threshold))


def match_modules(
    source_keys: Sequence[str],
    source: WeightSource,
    target: WeightSource,
    config: TransferConfig,
    cache: BasisCache | None = None,
    progress: ProgressFn | None = None,
    check_interrupt: Callable[[], None] | None = None,
) -> tuple[dict[str, ModuleMatch], RunStats]:
    """Bases of each source weight in ``source_keys`` and of its target weight, paired and compared.

    Name pairing compares ``a.b.weight`` with the target's ``a.b.weight``; similarity pairing
    compares it with every target weight of the same shape and keeps the most similar one (this
    needs the bases of all those candidates: one basis per candidate, computed once per run).
    """
    t0 = time.perf_counter()
    provider = BasisProvider(config.basis, resolve_device(config.device), cache)
    target_index, source_index = BaseIndex(target.keys()), BaseIndex(source.keys())
    candidates = _candidates(target) if config.pairing == "similarity" else {}
    cand_bases: dict[tuple[str, int], Basis] = {}
    matches: dict[str, ModuleMatch] = {}
    unique = list(dict.fromkeys(source_keys))
    for step, skey in enumerate(unique):
        if check_interrupt is not None:
            check_interrupt()
        if progress is not None:
            progress(step, len(unique), skey)
        sshape = source.shape(skey)
        m, n = matrix_shape(sshape)
        name_key = target_index.find_bare(source_index.bare_name(skey))
        same_shape = name_key is not None and matrix_shape(target.shape(name_key)) == (m, n)
        match = ModuleMatch(skey, None, name_key, config.rank_for(m, n))
        matches[skey] = match
        if config.mode == "copy":
            match.target_key = name_key if same_shape else None
            match.reason = "" if same_shape else "target has no weight of that name and shape"
            continue
        if config.pairing == "name" and not same_shape:
            match.reason = "target has no weight of that name" if name_key is None else f"target weight has another shape {list(target.shape(name_key))}"
            continue
        match.source_basis = provider.get(source, skey, match.k)
        if config.pairing == "name":
            match.target_key, match.target_basis = name_key, provider.get(target, name_key, match.k)  # type: ignore[arg-type]
            match.similarity = basis_similarity(match.source_basis, match.target_basis)
            continue
        for ckey in candidates.get(_shape_class(sshape), []):
            cb = cand_bases.get((ckey, match.k))
            if cb is None:
                cb = cand_bases[(ckey, match.k)] = provider.get(target, ckey, match.k)
            s = basis_similarity(match.source_basis, cb)
            if match.similarity is None or s.phi > match.similarity.phi:
                match.target_key, match.similarity, match.target_basis = ckey, s, cb
        match.reason = "" if match.target_key else "target has no weight of that shape"
    provider.stats.seconds = time.perf_counter() - t0
    return matches, provider.stats


NameFn = Callable[[Planned, ModuleMatch], str]


def default_output_name(p: Planned, match: ModuleMatch) -> str:
    """The input's own module name, or the target module's name in the input's style when re-paired."""
    if not match.repaired:
        return p.module.name
    return name_style(p.module.name).encode(BaseIndex([match.target_key]).bare_name(match.target_key))  # type: ignore[list-item,arg-type]


def project_loras(loras: Sequence[LoraFile], plan: Sequence[Planned], matches: dict[str, ModuleMatch], config: TransferConfig,
                  check_interrupt: Callable[[], None] | None = None, output_name: NameFn = default_output_name) -> list[TransferResult]:
    """Project every planned LoRA module with its match; modules that do not pass are reported.

    ``output_name`` names each output module (default: as in the input). Updates that land on the
    same output module are summed."""
    reports: list[list[ModuleReport]] = [[] for _ in loras]
    pieces: list[dict[str, list[tuple[Factors, LoraModule]]]] = [{} for _ in loras]
    for p in plan:
        if check_interrupt is not None:
            check_interrupt()
        lora = loras[p.lora_index]
        f = p.module.factors()
        rep = ModuleReport(str(lora.path or "<LoRA>"), p.module.name, None, p.source_key, None, False, "no base weight",
                           source_norm=f.frobenius_norm())
        reports[p.lora_index].append(rep)
        match = matches.get(p.source_key) if p.source_key is not None else None
        if match is None:
            continue
        rep.reason = match.reason
        if match.similarity is not None:
            s = match.similarity
            rep.similarity_u, rep.similarity_v, rep.chance_u, rep.chance_v, rep.subspace_rank = s.phi_u, s.phi_v, s.chance_u, s.chance_v, match.k
        if match.target_key is None:
            continue
        if not match.passes(config):
            rep.reason = "below threshold"
            continue
        out = f if config.mode == "copy" else project(f, match.source_basis, match.target_basis, config.mode)  # type: ignore[arg-type]
        out = Factors(out.up.to("cpu", torch.float32), out.down.to("cpu", torch.float32), out.scale)
        norm = out.frobenius_norm()
        if config.rescale_to_source_norm and norm > 0:
            out = Factors(out.up, out.down, out.scale * rep.source_norm / norm)
            norm = rep.source_norm
        rep.transferred, rep.reason, rep.transferred_norm = True, "transferred", norm
        rep.target_key, rep.target, rep.repaired = match.target_key, BaseIndex([match.target_key]).bare_name(match.target_key), match.repaired
        pieces[p.lora_index].setdefault(output_name(p, match), []).append((out, p.module))
    results = []
    for i, lora in enumerate(loras):
        tensors, dropped = _assemble(lora, pieces[i], config)
        results.append(TransferResult(lora, tensors, reports[i], dropped))
    return results


def transfer(
    loras: Sequence[LoraFile],
    plan: Sequence[Planned],
    source: WeightSource,
    target: WeightSource,
    config: TransferConfig,
    cache: BasisCache | None = None,
    progress: ProgressFn | None = None,
    check_interrupt: Callable[[], None] | None = None,
) -> tuple[list[TransferResult], RunStats]:
    """Check the plan, match the touched source weights, project every LoRA: one pass over the
    bases serves all LoRAs."""
    for p in plan:
        if p.source_key is not None:
            check_fits(loras[p.lora_index], p.module, source.shape(p.source_key), source.label)
    keys = [p.source_key for p in plan if p.source_key is not None]
    matches, stats = match_modules(keys, source, target, config, cache, progress, check_interrupt)
    t0 = time.perf_counter()
    results = project_loras(loras, plan, matches, config, check_interrupt)
    stats.seconds += time.perf_counter() - t0
    return results, stats


def _shape_class(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (len(shape), *matrix_shape(shape))


def _candidates(target: WeightSource) -> dict[tuple[int, ...], list[str]]:
    """Target weights by shape class: what similarity pairing may choose from."""
    out: dict[tuple[int, ...], list[str]] = {}
    for key in target.keys():
        shape = target.shape(key)
        if key.endswith(".weight") and len(shape) in (2, 4) and min(matrix_shape(shape)) > 1:
            out.setdefault(_shape_class(shape), []).append(key)
    return out


def _assemble(lora: LoraFile, pieces: dict[str, list[tuple[Factors, LoraModule]]], config: TransferConfig) -> tuple[dict[str, Tensor], float | None]:
    """Output tensors; updates that land on one target module are summed (factors concatenated)."""
    tensors: dict[str, Tensor] = {}
    kept = total = 0.0
    for name, parts in pieces.items():
        if len(parts) == 1:
            f = parts[0][0]
        else:
            f = Factors(torch.cat([p.up * p.scale for p, _ in parts], dim=1), torch.cat([p.down for p, _ in parts], dim=0), 1.0)
        if config.out_rank is not None and config.out_rank < f.rank:
            norm2 = f.frobenius_norm() ** 2
            rc = recompress(f, config.out_rank)
            total += norm2
            kept += norm2 * (1.0 - rc.energy_dropped)
            f = rc.factors
        tensors.update(module_tensors(name, f, parts[0][1], lora.dtype))
    dropped = (1.0 - kept / total) if config.out_rank is not None and total > 0 else (0.0 if config.out_rank is not None else None)
    return tensors, dropped
