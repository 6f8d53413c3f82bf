"""What a transfer reports: each LoRA module's fate, the output tensors, run statistics."""
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
    #: top-k subspace (0: exact bases; ~1e-5 on a clear spectral gap, ~0.06 on a gap-less power law)
    basis_uncertainty: float | None = None

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
