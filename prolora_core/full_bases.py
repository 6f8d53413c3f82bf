"""Full thin SVDs of source weights for mode ``casa`` (:mod:`.casa`), computed once per weight.

CASA writes a LoRA update in the coordinates of *all* of a source weight's singular vectors, so it
needs ``W_s = U diag(S) Vᵀ`` in full (``U`` ``m × d``, ``V`` ``n × d``, ``d = min(m, n)``), not the
top-k bases the projections use. :class:`FullBases` serves them, in this order:

1. this run's memory: the first SVDs of the run that fit ``max_bytes`` are kept for the whole run,
   later ones are used and dropped. A run visits the same source weights in the same order for
   every LoRA and target (a cyclic scan), where least-recently-used eviction would drop each SVD
   just before its next use once the working set exceeds the budget; keeping the first ones serves
   ``max_bytes`` worth from memory to every later LoRA;
2. the basis cache on disk (:meth:`.cache.BasisCache.load_full`: its own entry kind, keyed by the
   weight's content key and :func:`full_key`);
3. computed (:func:`.casa.source_svd`), kept in memory when it fits, and written to disk while this
   run's full-SVD writes stay within ``disk_max_bytes`` (the cache's size limit, so a run never
   writes more than the cache may keep).

Entries are exact (the compute dtype, never rounded), so a CASA result is bitwise the same cold,
warm or uncached. The compute dtype follows :func:`.casa.compute_dtype` (float64 on the CPU up to
4 M entries, else float32) and is part of the key, with the device kind.

Cost: ``(m + n + 1) · d`` numbers per weight, about twice the weight itself in its compute dtype
(``bench/full_bases.py`` prints it per model, GB = 2**30 bytes: SDXL's 722 transformer linears 19.1 GB
as kept on the CPU (12.1 GB in float32), Flux-dev's block weights 54.8 GB, Wan-14B's 91.4 GB).
The memory budget (:data:`DEFAULT_MEMORY_MB`) bounds what a run holds; on disk, a run writes at most
the cache's size limit of full SVDs, and :meth:`.cache.BasisCache.evict` (after the run) drops full
entries before any top-k basis, least recently used first, so full SVDs never push out the small
top-k bases every mode needs.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from .casa import compute_dtype, source_svd
from .linalg import as_matrix, matrix_shape
from .report import RunStats
from .weights import WeightSource

#: The memory a run may hold full SVDs in, MB (2**20 bytes).
DEFAULT_MEMORY_MB = 2048

SVD = tuple[Tensor, Tensor, Tensor]


class FullStore(Protocol):
    def load_full(self, content_key: str, full_key: str, shape: tuple[int, int]) -> SVD | None: ...

    def store_full(self, content_key: str, full_key: str, U: Tensor, S: Tensor, V: Tensor) -> None: ...


def full_key(dtype: torch.dtype, device: torch.device) -> str:
    """The settings part of a full SVD's cache key: ``full-v1-float64-cpu``."""
    return f"full-v1-{str(dtype).removeprefix('torch.')}-{device.type}"


def svd_bytes(m: int, n: int, dtype: torch.dtype) -> int:
    """Bytes of the thin SVD of an ``m × n`` matrix: ``(m + n + 1) · min(m, n)`` numbers of ``dtype``."""
    return (m + n + 1) * min(m, n) * (torch.finfo(dtype).bits // 8)


class FullBases:
    """Full thin SVDs of source weights: memory (the first that fit ``max_bytes``), then ``disk``, then
    computed (written to ``disk`` up to ``disk_max_bytes`` per run; ``None``: no limit).
    ``stats.full_svd_computed`` / ``stats.full_bases_from_cache`` count what each :meth:`get` did."""

    def __init__(self, disk: FullStore | None = None, max_bytes: int = DEFAULT_MEMORY_MB * 2**20,
                 disk_max_bytes: int | None = None) -> None:
        if max_bytes < 0 or (disk_max_bytes is not None and disk_max_bytes < 0):
            raise ValueError(f"the byte budgets of full bases must not be negative, got {max_bytes} and {disk_max_bytes}")
        self.disk = disk
        self.max_bytes = max_bytes
        self.disk_max_bytes = disk_max_bytes
        self._written = 0
        self.stats = RunStats()
        self._held: dict[tuple[str, tuple[int, int], str], SVD] = {}
        self._bytes = 0

    @property
    def held_bytes(self) -> int:
        """Bytes of the SVDs held in memory now (at most ``max_bytes``)."""
        return self._bytes

    def get(self, source: WeightSource, key: str, device: torch.device) -> SVD:
        """``(U, S, V)`` of ``source``'s weight ``key`` as a matrix (:func:`.linalg.as_matrix`), in
        :func:`.casa.compute_dtype` for ``device``, on ``device``."""
        m, n = matrix_shape(source.shape(key))
        dt = compute_dtype(m, n, device)
        fk = full_key(dt, device)
        ck = source.content_key(key)
        slot = (ck, (m, n), fk)
        svd = self._held.get(slot)
        if svd is not None:
            self.stats.full_bases_from_cache += 1
            return svd
        svd = self.disk.load_full(ck, fk, (m, n)) if self.disk is not None else None
        if svd is not None:
            svd = tuple(t.to(device) for t in svd)  # type: ignore[assignment]
            self.stats.full_bases_from_cache += 1
        else:
            svd = source_svd(as_matrix(source.get(key).detach()).to(device, dt))
            self.stats.full_svd_computed += 1
            size = sum(t.numel() * t.element_size() for t in svd)
            if self.disk is not None and (self.disk_max_bytes is None or self._written + size <= self.disk_max_bytes):
                self.disk.store_full(ck, fk, *svd)
                self._written += size
        self._keep(slot, svd)  # type: ignore[arg-type]
        return svd  # type: ignore[return-value]

    def _keep(self, slot: tuple[str, tuple[int, int], str], svd: SVD) -> None:
        size = sum(t.numel() * t.element_size() for t in svd)
        if self._bytes + size > self.max_bytes:
            return  # used once, not kept: what is held stays for the rest of the run
        self._held[slot] = svd
        self._bytes += size
