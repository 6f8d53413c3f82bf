"""What to transfer and how: modes, pairing, threshold, subspace rank, output rank, device.

Defaults are chosen by the zoo evidence (README, "Choosing the defaults").
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from .basis import BasisSettings, clamp_rank, default_rank
from .casa import CasaSettings
from .errors import ProLoRAError
from .projection import MODES, Mode

Pairing = Literal["name", "similarity"]
PAIRINGS: tuple[Pairing, ...] = ("name", "similarity")
#: Defaults (see README, "Choosing the defaults").
DEFAULT_MODE: Mode = "auto"
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
    cpu_threads: int | None = None  # torch CPU threads for bases and projections; None: torch's own setting
    casa: CasaSettings = field(default_factory=CasaSettings)  # mode "casa" only

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ProLoRAError(f"unknown mode '{self.mode}'; choose one of {', '.join(MODES)}")
        if self.pairing not in PAIRINGS:
            raise ProLoRAError(f"unknown pairing '{self.pairing}'; choose name or similarity")
        if not (0.0 <= self.threshold <= 1.0):
            raise ProLoRAError(f"threshold must lie in [0, 1], got {self.threshold}")
        if self.subspace_rank is not None and self.subspace_rank <= 0:
            raise ProLoRAError(f"subspace rank must be positive, got {self.subspace_rank}")
        if self.cpu_threads is not None and self.cpu_threads <= 0:
            raise ProLoRAError(f"threads must be positive, got {self.cpu_threads}")
        if self.out_rank is not None and self.out_rank <= 0:
            raise ProLoRAError(f"output rank must be positive, got {self.out_rank}")

    def rank_for(self, m: int, n: int) -> int:
        return clamp_rank(self.subspace_rank, m, n) if self.subspace_rank is not None else default_rank(m, n)

    @property
    def threads(self) -> int | None:
        """One CPU thread when the basis settings ask for bit-for-bit reproducible results, else ``cpu_threads``."""
        return 1 if self.basis.deterministic else self.cpu_threads


def default_threads() -> int:
    """Half the CPU cores, at most 4 (at least 1): a transfer beside ComfyUI's sampling leaves it
    most of the machine (bench/bench_threads.py measures both side by side)."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


#: ``progress(step, total, what)``: called before each step of a long loop.
ProgressFn = Callable[[int, int, str], None]
