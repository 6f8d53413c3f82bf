"""The transfer itself: plan which base weight each LoRA module sits on, then per source weight
compute (or load) the bases once, match the target module, filter by Φ and project every LoRA's
module on it. Many LoRAs share one pass over the bases; weights are streamed one at a time.

Per adapter type (see :mod:`.adapters`): LoRA/LoCon factors are projected in factored form; LoHa
and LoKr as their dense ``ΔW``, re-factored into a LoRA; a 2-D/4-D ``.diff`` densely, written back
as a ``.diff``; a DoRA magnitude by the ratio rule; 1-D parts are carried over unchanged (a module
made only of them needs no basis). In ``copy`` mode every module is written back as it came.
"""
from __future__ import annotations

import time
from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor

from .adapters import FullDiff, LoraModule, Module, dora_magnitude, dora_on_output_axis, refactor
from .basis import Basis, BasisSettings, clamp_rank, compute_basis, default_rank
from .cache import BasisCache
from .errors import ProLoRAError
from .linalg import all_finite, cpu_fallback, matrix_shape, resolve_device, torch_threads
from .lora import LoraFile, module_tensors, split_module_key
from .names import BaseIndex, name_style
from .projection import MODES, Factors, Mode, project, project_dense, recompress
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
    save_dtype: torch.dtype | None = None  # output dtype; None: the input LoRA's

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

    @property
    def threads(self) -> int | None:
        """One CPU thread when the basis settings ask for bit-for-bit reproducible results."""
        return 1 if self.basis.deterministic else None


@dataclass
class ModuleReport:
    """One LoRA module's fate. Norms are Frobenius norms of the dense ``ΔW`` (scale included).

    ``kind``: lora, loha, lokr, diff, or none (only 1-D parts). ``energy_kept``: the share of the
    projected update's energy (Σσ²) kept when it was re-factored or re-compressed."""

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
    kind: str = "lora"
    energy_kept: float | None = None

    @property
    def norm_ratio(self) -> float | None:
        if self.transferred_norm is None or self.source_norm == 0:
            return None
        return self.transferred_norm / self.source_norm

    def as_dict(self) -> dict:
        d = asdict(self)
        d["norm_ratio"] = self.norm_ratio
        return d


def overall_norm_ratio(modules: Iterable[ModuleReport]) -> float | None:
    """‖ΔW‖ after / before over all transferred modules together (Frobenius); None when none moved."""
    done = [m for m in modules if m.transferred]
    src = sum(m.source_norm**2 for m in done) ** 0.5
    out = sum((m.transferred_norm or 0.0) ** 2 for m in done) ** 0.5
    return out / src if src > 0 else None


@dataclass
class TransferResult:
    """The output of one LoRA: tensors to save (kohya-dotted) and the per-module report."""

    lora: LoraFile
    tensors: dict[str, Tensor]
    modules: list[ModuleReport]
    energy_dropped: float | None = None

    def summary(self) -> dict:
        done = [m for m in self.modules if m.transferred]
        return {
            "modules": len(self.modules),
            "transferred": len(done),
            "below_threshold": sum(m.reason == "below threshold" for m in self.modules),
            "no_base_weight": sum(m.source_key is None for m in self.modules),
            "not_in_target": sum(m.reason.startswith("target") for m in self.modules),
            "repaired": sum(m.repaired for m in self.modules),
            "norm_ratio": overall_norm_ratio(self.modules),
            "energy_dropped": self.energy_dropped,
            "energy_kept": None if self.energy_dropped is None else 1.0 - self.energy_dropped,
            "output_modules": len({split_module_key(k)[0] for k in self.tensors}),
        }


@dataclass
class RunStats:
    svd_computed: int = 0
    bases_from_cache: int = 0
    seconds: float = 0.0
    worst_subspace_change: float = 0.0


ProgressFn = Callable[[int, int, str], None]


def _weight_is_finite(w: Tensor) -> bool:
    """:func:`all_finite` of a base weight in one reduction pass.

    ``aminmax`` propagates NaN and returns ±Inf when one is present, so both ends are finite exactly
    when every entry is. On CPU half-precision weights this is ~10× faster than
    ``isfinite(w).all()``, which took ~15 % of a cold run (bench/bench_transfer.py).
    """
    if not torch.is_floating_point(w) or w.element_size() == 1 or w.numel() == 0:
        return all_finite(w)
    lo, hi = torch.aminmax(w)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


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
        if not _weight_is_finite(w):
            # The full path when the source has one: source and target are often both "model.safetensors".
            raise ProLoRAError("base weight contains NaN or Inf values", file=getattr(source, "path", None) or source.label, key=key)
        basis = cpu_fallback(f"the basis of {key}", lambda dev: compute_basis(w, k, self.settings, dev or self.device))
        self.stats.svd_computed += 1
        self.stats.worst_subspace_change = max(self.stats.worst_subspace_change, basis.subspace_change)
        if self.cache is not None:
            self.cache.store(ck, basis)
        return basis


@dataclass(frozen=True)
class Planned:
    """A LoRA module placed on a source weight (``source_key=None``: no base weight found)."""

    lora_index: int
    module: Module
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


def check_fits(lora: LoraFile, mod: Module, weight_shape: tuple[int, ...], base_label: str) -> None:
    """Refuse a LoRA module whose shape does not fit its base weight, saying why."""
    where = lora.path or "<LoRA>"
    shape = tuple(int(d) for d in weight_shape)
    u = mod.update
    if u is not None and len(shape) < 2:
        raise ProLoRAError(f"a weight update on the 1-D weight {list(shape)} of {base_label}", file=where, key=u.key)
    if isinstance(u, LoraModule):
        if u.is_conv and len(shape) != 4:
            raise ProLoRAError(f"conv LoRA {list(u.down.shape)} on a linear weight {list(shape)} of {base_label}", file=where, key=u.down_key)
        if not u.is_conv and len(shape) == 4 and shape[2:] != (1, 1):
            raise ProLoRAError(f"linear LoRA on a conv weight {list(shape)} of {base_label}", file=where, key=u.down_key)
    if u is not None and (u.matrix_shape != matrix_shape(shape) or isinstance(u, FullDiff) and tuple(u.diff.shape) != shape):
        raise ProLoRAError(
            f"LoRA update is {u.matrix_shape[0]}×{u.matrix_shape[1]} but the weight in {base_label} is {list(shape)}: "
            "this looks like a LoRA for another base model", file=where, key=u.key)
    if isinstance(u, LoraModule) and u.rank > min(u.matrix_shape):
        raise ProLoRAError(f"rank {u.rank} is larger than the weight allows (min of {u.matrix_shape})", file=where, key=u.down_key)
    if mod.dora_scale is not None and mod.dora_scale.numel() != shape[0 if dora_on_output_axis(mod.dora_scale, shape) else 1]:
        raise ProLoRAError(f"DoRA magnitude of shape {list(mod.dora_scale.shape)} fits neither the rows nor the input channels of "
                           f"the weight {list(shape)} in {base_label}", file=where, key=mod.dora_key)
    for suffix, t in mod.carried.items():
        want = (shape[0],) if suffix in (".diff_b", ".b_norm") else shape
        if tuple(t.shape) != want:
            raise ProLoRAError(f"has shape {list(t.shape)} but the weight in {base_label} is {list(shape)} (needs {list(want)}): "
                               "this looks like a LoRA for another base model", file=where, key=mod.name + suffix)


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
    basis_free: bool = False  # paired by name alone (copy mode, 1-D weights, 1-D parts only): no Φ

    @property
    def repaired(self) -> bool:
        return self.target_key is not None and self.target_key != self.name_key

    def passes(self, config: "TransferConfig") -> bool:
        if self.target_key is None:
            return False
        return config.mode == "copy" or self.basis_free or (self.similarity is not None and self.similarity.passes(config.threshold))


def match_modules(
    source_keys: Sequence[str],
    source: WeightSource,
    target: WeightSource,
    config: TransferConfig,
    cache: BasisCache | None = None,
    progress: ProgressFn | None = None,
    check_interrupt: Callable[[], None] | None = None,
    pair_only: Collection[str] = (),
) -> tuple[dict[str, ModuleMatch], RunStats]:
    """Bases of each source weight in ``source_keys`` and of its target weight, paired and compared.

    Name pairing compares ``a.b.weight`` with the target's ``a.b.weight``; similarity pairing
    compares it with every target weight of the same shape and keeps the most similar one (this
    needs the bases of all those candidates: one basis per candidate, computed once per run).
    Keys in ``pair_only`` and 1-D weights are paired by name with no basis (``basis_free``).
    """
    with torch_threads(config.threads):
        return _match_modules(source_keys, source, target, config, cache, progress, check_interrupt, pair_only)


def _match_modules(source_keys: Sequence[str], source: WeightSource, target: WeightSource, config: TransferConfig, cache: BasisCache | None,
                   progress: ProgressFn | None, check_interrupt: Callable[[], None] | None,
                   pair_only: Collection[str]) -> tuple[dict[str, ModuleMatch], RunStats]:
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
        if config.mode == "copy" or skey in pair_only or len(sshape) < 2:
            match.basis_free = True
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


@dataclass
class Piece:
    """One module's output before it is written: LoRA factors (written in ``layout``: the input
    LoRA module's, or a base weight's shape) and other tensors by suffix (``.diff``, ``.dora_scale``,
    carried 1-D parts, or a module copied as it came)."""

    report: ModuleReport
    factors: Factors | None = None
    layout: LoraModule | tuple[int, ...] = ()
    tensors: dict[str, Tensor] = field(default_factory=dict)
    energy: tuple[float, float] | None = None  # (kept, total) Σσ² of a re-factored update

    @property
    def summable(self) -> bool:
        """Plain LoRA factors and nothing else: pieces like this on one output module are summed."""
        return self.factors is not None and not self.tensors


Weights = tuple[WeightSource | None, WeightSource | None]


def project_loras(loras: Sequence[LoraFile], plan: Sequence[Planned], matches: dict[str, ModuleMatch], config: TransferConfig,
                  check_interrupt: Callable[[], None] | None = None, output_name: NameFn = default_output_name,
                  source: WeightSource | None = None, target: WeightSource | None = None) -> list[TransferResult]:
    """Project every planned LoRA module with its match; modules that do not pass are reported.

    ``output_name`` names each output module (default: as in the input). Plain LoRA updates that
    land on the same output module are summed. ``source`` and ``target`` are needed by DoRA
    modules only (the ratio rule reads both weights). A CUDA out-of-memory error in one module
    redoes that module on the CPU, with a warning."""
    reports: list[list[ModuleReport]] = [[] for _ in loras]
    pieces: list[dict[str, list[Piece]]] = [{} for _ in loras]
    with torch_threads(config.threads):
        for p in plan:
            if check_interrupt is not None:
                check_interrupt()
            lora, mod = loras[p.lora_index], p.module
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
            if match.target_key is None:
                continue
            if mod.update is not None and not match.passes(config):  # Φ filters projections; 1-D parts are carried
                rep.reason = "below threshold"
                continue
            piece = cpu_fallback(f"the projection of {mod.name}",
                                 lambda dev: _transfer_module(rep, mod, match, config, lora.dtype, (source, target), dev))  # noqa: B023
            rep.transferred, rep.reason = True, "transferred" if mod.update is not None else "carried over unchanged"
            rep.target_key, rep.target, rep.repaired = match.target_key, BaseIndex([match.target_key]).bare_name(match.target_key), match.repaired
            pieces[p.lora_index].setdefault(output_name(p, match), []).append(piece)
        results = []
        for i, lora in enumerate(loras):
            tensors, dropped = _assemble(lora, pieces[i], config)
            results.append(TransferResult(lora, tensors, reports[i], dropped))
    return results


def _transfer_module(rep: ModuleReport, mod: Module, match: ModuleMatch, config: TransferConfig, lora_dtype: torch.dtype,
                     weights: Weights, device: torch.device | None) -> Piece:
    """One module's output on ``match`` (bases moved to ``device`` when given); sets the report's
    transferred norm and energy kept."""
    keep = (lambda t: t) if config.save_dtype is None else (lambda t: t.to(config.save_dtype))
    piece = Piece(rep, tensors={s: keep(t) for s, t in mod.carried.items()})
    u = mod.update
    if u is None:
        return piece
    copy = config.mode == "copy"
    if copy and not isinstance(u, LoraModule):  # written back exactly as it came
        piece.tensors.update({s: keep(t) for s, t in (u.parts.items() if not isinstance(u, FullDiff) else [(".diff", u.diff)])})
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
    diff: Tensor | None = None
    if isinstance(u, LoraModule):
        f = u.factors() if copy else project(u.factors(), bs, bt, config.mode)  # type: ignore[arg-type]
        piece.factors, piece.layout = Factors(f.up.to("cpu", torch.float32), f.down.to("cpu", torch.float32), f.scale), u
        norm = piece.factors.frobenius_norm()
    else:
        delta = project_dense(u.dense(), bs, bt, config.mode)  # type: ignore[arg-type]
        norm = float(delta.double().norm())
        if isinstance(u, FullDiff):
            diff = delta.to("cpu", torch.float32).reshape(bt.shape)  # type: ignore[union-attr]
        else:
            rf = refactor(delta, config.out_rank)
            piece.factors, piece.layout, piece.energy = rf.factors, bt.shape, (rf.energy_kept * norm**2, norm**2)  # type: ignore[union-attr]
            rep.energy_kept, norm = rf.energy_kept, rf.factors.frobenius_norm()
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


def _dora(mod: Module, match: ModuleMatch, weights: Weights) -> Tensor:
    source, target = weights
    if source is None or target is None:
        raise ProLoRAError("DoRA modules need the source and target weights (project_loras(..., source=, target=))", key=mod.dora_key)
    return dora_magnitude(mod.dora_scale, source.get(match.source_key), target.get(match.target_key))  # type: ignore[arg-type]


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
    bases serves all LoRAs. Source weights that only carry 1-D parts get no basis."""
    for p in plan:
        if p.source_key is not None:
            check_fits(loras[p.lora_index], p.module, source.shape(p.source_key), source.label)
    keys = [p.source_key for p in plan if p.source_key is not None]
    pair_only = set(keys) - {p.source_key for p in plan if p.module.update is not None}
    matches, stats = match_modules(keys, source, target, config, cache, progress, check_interrupt, pair_only)
    t0 = time.perf_counter()
    results = project_loras(loras, plan, matches, config, check_interrupt, source=source, target=target)
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

