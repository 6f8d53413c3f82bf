"""What a transfer reports: each LoRA module's fate, the output tensors, run statistics, and the
one count of those fates that the CLI and the nodes print (:meth:`TransferResult.summary`,
:func:`format_summary`): its groups add up to the LoRA's modules."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

from torch import Tensor

from .lora import LoraFile, split_module_key


@dataclass
class ModuleReport:
    """One LoRA module's fate. Norms are Frobenius norms of the dense ``ΔW`` (scale included).

    ``kind``: lora, loha, lokr, diff, or none (only 1-D parts). ``energy_kept``: the share of the
    projected update's energy (Σσ²) kept when it was re-factored or re-compressed.
    ``basis_uncertainty``: how far the bases used may be from the exact ones (see ``Basis.uncertainty``)."""

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
    #: the larger estimated sin θ_max between the source's or target's randomized basis and the exact
    #: top-k subspace (0: exact bases; ~1e-5 on a clear spectral gap; ≤ 1e-3, the stopping tolerance, on a gap-less power law)
    basis_uncertainty: float | None = None
    #: for a module not transferred: the most similar target weight found, and its Φ (min of Φ_U, Φ_V)
    candidate: str | None = None
    candidate_phi: float | None = None

    @property
    def group(self) -> str:
        """The summary group of this module's fate (a key of :data:`GROUPS`)."""
        if self.transferred:
            return "carried_over" if self.reason == "carried over unchanged" else "transferred"
        if self.source_key is None:
            return "not_mapped_text_encoder" if is_text_encoder_module(self.source) else "not_mapped"
        if self.reason.startswith("below threshold"):
            return "below_threshold"
        if self.reason.startswith("target has no weight of that name"):
            return "no_such_module"
        if self.reason.startswith(("target weight has another shape", "target has no weight of that shape")):
            return "not_in_target"
        if self.reason.startswith("another module already landed"):
            return "not_summed"
        return "other"

    @property
    def norm_ratio(self) -> float | None:
        if self.transferred_norm is None or self.source_norm == 0:
            return None
        return self.transferred_norm / self.source_norm

    def as_dict(self) -> dict:
        d = asdict(self)
        d["norm_ratio"] = self.norm_ratio
        return d


#: Summary groups in print order, with the reason printed for each.
GROUPS: dict[str, str] = {
    "transferred": "transferred",
    "carried_over": "carried over unchanged (1-D parts only)",
    "below_threshold": "below threshold",
    "no_such_module": "target has no such module (e.g. a removed block)",
    "not_in_target": "not in the target in that shape",
    "not_mapped_text_encoder": "not mapped: text-encoder modules",
    "not_mapped": "not mapped: no weight of that name in the source model",
    "not_summed": "not summed: another module landed on the same target weight",
    "other": "other",
}
_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te_", "te1", "te2", "te3", "cond_stage_model", "conditioner.embedders", "clip_", "t5")


def is_text_encoder_module(name: str) -> bool:
    """Whether a LoRA module name belongs to a text encoder (kohya ``lora_te*``, diffusers
    ``text_encoder*``, ComfyUI ``text_encoders.*``, LDM ``cond_stage_model.*`` …)."""
    bare = name.removeprefix("base_model.model.").removeprefix("text_encoders.")
    return name.startswith("text_encoders.") or bare.startswith(_TEXT_ENCODER_PREFIXES)


@dataclass
class SimilarityHint:
    """How many modules skipped under name pairing (below threshold, or no target weight of that
    name) similarity pairing may place: ``placed`` of the ``looked_at`` examined, of ``skipped``."""

    placed: int
    looked_at: int
    skipped: int

    @property
    def estimate(self) -> int:
        """``placed`` scaled to all skipped modules (exact when every one was examined)."""
        if self.looked_at == 0:
            return 0
        return self.placed if self.looked_at >= self.skipped else round(self.placed * self.skipped / self.looked_at)


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
    similarity_hint: SimilarityHint | None = None

    def summary(self) -> dict:
        """Counts of the modules' fates. ``groups`` (every key of :data:`GROUPS`) add up to
        ``modules``; the other counts are kept for the report JSON and the file metadata."""
        groups = dict.fromkeys(GROUPS, 0)
        for m in self.modules:
            groups[m.group] += 1
        hint = self.similarity_hint
        return {
            "groups": groups,
            "similarity_may_place": None if hint is None else hint.estimate,
            "similarity_hint": None if hint is None else asdict(hint),
            "modules": len(self.modules),
            "transferred": sum(m.transferred for m in self.modules),
            "below_threshold": sum(m.reason.startswith("below threshold") for m in self.modules),
            "no_base_weight": sum(m.source_key is None for m in self.modules),
            "not_in_target": sum(m.reason.startswith("target") for m in self.modules),
            "repaired": sum(m.repaired for m in self.modules),
            "norm_ratio": overall_norm_ratio(self.modules),
            "energy_dropped": self.energy_dropped,
            "energy_kept": None if self.energy_dropped is None else 1.0 - self.energy_dropped,
            "output_modules": len({split_module_key(k)[0] for k in self.tensors}),
        }


def format_summary(name: str, summary: dict, threshold: float, text_encoder_reason: str = "text-encoder names are not mapped from files yet",
                   labels: dict[str, str] | None = None) -> list[str]:
    """What people read: ``name: N modules`` then one line per non-empty group with its reason, the
    similarity-pairing hint where it applies. Numbers rounded for reading (the report JSON keeps
    full precision).

    ``text_encoder_reason`` says why text-encoder modules found no weight (the files path does
    not map text-encoder names; the model path needs a CLIP). ``labels`` replaces group labels
    (Match Modules: "pass (would be transferred)")."""
    g = summary["groups"]
    lines = [f"{name}: {summary['modules']} modules"]
    width = len(str(summary["modules"]))
    for key, label in GROUPS.items():
        n = g.get(key, 0)
        if not n:
            continue
        text = (labels or {}).get(key, label)
        if key == "transferred":
            extra = []
            if summary.get("norm_ratio") is not None:
                extra.append(f"norm ratio {summary['norm_ratio']:.2f}")
            if summary.get("energy_kept") is not None:
                extra.append(f"{summary['energy_kept']:.2%} of the energy kept")
            if summary.get("repaired"):
                extra.append(f"{summary['repaired']} re-paired by similarity")
            text += f" ({', '.join(extra)})" if extra else ""
        elif key == "below_threshold":
            text += f" (Φ < {threshold:g})"
        elif key == "not_mapped_text_encoder":
            text += f" ({text_encoder_reason})"
        lines.append(f"  {n:>{width}} {text}")
    may = summary.get("similarity_may_place")
    if may:
        skipped = g.get("below_threshold", 0) + g.get("no_such_module", 0)
        hint = summary.get("similarity_hint") or {}
        about = "" if hint.get("looked_at", 0) >= hint.get("skipped", 0) else f"about {may} (estimated on {hint['looked_at']})"
        lines.append(f"  → similarity pairing may place {about or may} of these {skipped} (pairing = similarity)")
    return lines


@dataclass
class RunStats:
    svd_computed: int = 0
    bases_from_cache: int = 0
    full_svd_computed: int = 0  # full thin SVDs of source weights (mode casa)
    full_bases_from_cache: int = 0  # … read from the basis cache or this run's memory instead
    seconds: float = 0.0
    worst_subspace_change: float = 0.0

    def add(self, other: RunStats) -> None:
        """Count ``other``'s run in this one: counts and seconds add, the worst change is the larger."""
        self.svd_computed += other.svd_computed
        self.bases_from_cache += other.bases_from_cache
        self.full_svd_computed += other.full_svd_computed
        self.full_bases_from_cache += other.full_bases_from_cache
        self.seconds += other.seconds
        self.worst_subspace_change = max(self.worst_subspace_change, other.worst_subspace_change)
