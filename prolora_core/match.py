"""Match (the paper's second step): the bases of each touched source weight and of its target
weight, paired by name or by subspace similarity Φ, and compared."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Collection
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from .basis import Basis, BasisSettings, compute_basis, compute_bases, stack_weights
from .cache import BasisCache
from .candidates import candidate_class, target_candidates
from .config import ProgressFn, TransferConfig
from .errors import ProLoRAError
from .linalg import all_finite, cpu_fallback, matrix_shape, resolve_device, torch_threads
from .names import BaseIndex
from .report import RunStats
from .similarity import Similarity, basis_similarity
from .slices import parse_place, with_slices
from .weights import WeightSource

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


#: Memory one batch of bases may take (the stacked weights in the compute dtype, plus the weights
#: being read for the next batch), in MB: on a CPU a batch then takes a few seconds at most (SDXL
#: shapes, one core), so progress never stalls for long; a GPU takes larger batches.
DEFAULT_BATCH_MB = {"cpu": 512, "cuda": 2048}

Request = tuple[WeightSource, str, int]  # (where, weight key, k)


class BasisProvider:
    """Bases of weights from a :class:`WeightSource`, through the cache when there is one.

    :meth:`prefetch` computes many bases at once: cache hits are loaded, the misses are grouped by
    matrix shape and k and go through :func:`compute_bases` as stacked batches of at most
    ``batch_mb`` MB, while a reader thread reads (and converts) the next batch's weights. :meth:`get`
    then serves them from memory; a basis not prefetched is computed alone.
    """

    def __init__(self, settings: BasisSettings, device: torch.device, cache: BasisCache | None = None,
                 batch_mb: float | None = None) -> None:
        self.settings = settings
        self.device = device
        self.cache = cache
        self.batch_mb = batch_mb if batch_mb is not None else DEFAULT_BATCH_MB.get(device.type, DEFAULT_BATCH_MB["cpu"])
        self.stats = RunStats()
        self._ready: dict[tuple[int, str, int], Basis] = {}

    def get(self, source: WeightSource, key: str, k: int) -> Basis:
        ready = self._ready.get((id(source), key, k))
        if ready is not None:
            return ready
        hit = self._cached(source, key, k)
        if hit is not None:
            return hit
        w = self._read(source, key)
        basis = cpu_fallback(f"the basis of {key}", lambda dev: compute_basis(w, k, self.settings, dev or self.device))
        self._computed(source, key, basis)
        return basis

    def prefetch(self, requests: Sequence[Request], progress: ProgressFn | None = None, total: int | None = None,
                 check_interrupt: Callable[[], None] | None = None) -> int:
        """Make the bases of ``requests`` ready for :meth:`get`, computed in batches by shape.

        ``progress(step, total, what)`` is called for each cache look-up and before each batch, ``step``
        counting the bases done before it (``total`` defaults to the number of distinct requests).
        Returns the number of bases made ready. Raises :class:`ProLoRAError` for a weight with NaN or Inf.
        """
        todo = list({(id(src), key, k): (src, key, k) for src, key, k in requests if (id(src), key, k) not in self._ready}.values())
        total = total if total is not None else len(todo)
        step = 0
        misses: dict[tuple[int, int, int], list[Request]] = {}
        for src, key, k in todo:
            if check_interrupt is not None:
                check_interrupt()
            hit = self._cached(src, key, k) is not None
            if progress is not None:  # a miss hashes the weight (cold: reads it), so it reports too
                progress(step, total, f"the basis of {key}" + (" (cache)" if hit else " (looked up)"))
            if hit:
                step += 1
            else:
                misses.setdefault((*matrix_shape(src.shape(key)), k), []).append((src, key, k))
        batches = [b for (m, n, k), group in misses.items() for b in _split(group, self._batch_size(m, n))]
        if not batches:
            return step
        cpu = self.device.type == "cpu"
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prolora-read") as reader:
            ahead = reader.submit(self._read_batch, batches[0], cpu)
            for i, batch in enumerate(batches):
                stacked = ahead.result()
                if i + 1 < len(batches):
                    ahead = reader.submit(self._read_batch, batches[i + 1], cpu)
                if check_interrupt is not None:
                    check_interrupt()
                k, shapes = batch[0][2], [src.shape(key) for src, key, _ in batch]
                more = f" and {len(batch) - 1} other weight(s) of that shape" if len(batch) > 1 else ""
                what = f"the basis of {batch[0][1]}{more}"
                if progress is not None:
                    progress(step, total, what)
                bases = cpu_fallback(what, lambda dev: compute_bases(stacked, k, self.settings, dev or self.device, shapes))  # noqa: B023, F821 (called before the del)
                del stacked
                for (src, key, _), basis in zip(batch, bases):
                    self._computed(src, key, basis)
                step += len(batch)
        return step

    def _batch_size(self, m: int, n: int) -> int:
        # the batch in the compute dtype and the next one being read (up to 4 bytes an entry each)
        per = m * n * (torch.finfo(self.settings.compute_dtype).bits // 8 + 4)
        return max(1, int(self.batch_mb * 2**20 // per))

    def _read_batch(self, batch: list[Request], cpu: bool) -> Tensor:
        ws = [self._read(src, key) for src, key, _ in batch]
        # On the CPU the conversion to the compute dtype happens here, in the reader thread; for a
        # GPU the weights travel in their own dtype (half the bytes) when they share one.
        same = all(w.dtype == ws[0].dtype for w in ws)
        return stack_weights(ws, self.settings.compute_dtype if cpu or not same else None)

    def _read(self, source: WeightSource, key: str) -> Tensor:
        w = source.get(key)
        if not _weight_is_finite(w):
            # The full path when the source has one: source and target are often both "model.safetensors".
            raise ProLoRAError("base weight contains NaN or Inf values", file=getattr(source, "path", None) or source.label, key=key)
        return w

    def _cached(self, source: WeightSource, key: str, k: int) -> Basis | None:
        if self.cache is None:
            return None
        hit = self.cache.load(source.content_key(key), k, source.shape(key))
        if hit is None:
            return None
        self.stats.bases_from_cache += 1
        basis = self._ready[(id(source), key, k)] = hit.to(self.device)
        return basis

    def _computed(self, source: WeightSource, key: str, basis: Basis) -> None:
        self.stats.svd_computed += 1
        self.stats.worst_subspace_change = max(self.stats.worst_subspace_change, basis.subspace_change)
        self._ready[(id(source), key, basis.k)] = basis
        if self.cache is not None:
            self.cache.store(source.content_key(key), basis)


def _split(items: list[Request], size: int) -> list[list[Request]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


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
    def uncertainty(self) -> float | None:
        """The larger :attr:`Basis.uncertainty` of the two bases (None without bases)."""
        bases = [b.uncertainty for b in (self.source_basis, self.target_basis) if b is not None]
        return max(bases) if bases else None

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
    compares it with the target weights of the same shape and keeps the most similar one: a sketch
    ranks every candidate (:class:`Sketches`) and Φ is computed exactly for the few that can win.
    Every basis needed is computed first, batched by shape (:meth:`BasisProvider.prefetch`), so
    ``progress`` moves from the first batch on. Keys in ``pair_only`` and 1-D weights are paired by
    name with no basis (``basis_free``). A slice or swapped view (virtual key, :mod:`.slices`) pairs
    by name with the same part of the target's weight, whatever ``config.pairing`` says.
    """
    with torch_threads(config.threads):
        return _match_modules(source_keys, source, target, config, cache, progress, check_interrupt, pair_only)


def _match_modules(source_keys: Sequence[str], source: WeightSource, target: WeightSource, config: TransferConfig, cache: BasisCache | None,
                   progress: ProgressFn | None, check_interrupt: Callable[[], None] | None,
                   pair_only: Collection[str]) -> tuple[dict[str, ModuleMatch], RunStats]:
    t0 = time.perf_counter()
    source, target = with_slices(source), with_slices(target)
    provider = BasisProvider(config.basis, resolve_device(config.device), cache)
    target_index, source_index = BaseIndex(target.keys()), BaseIndex(source.keys())
    candidates = target_candidates(target) if config.pairing == "similarity" else {}  # by (model part, kind, shape)
    matches: dict[str, ModuleMatch] = {}
    unique = list(dict.fromkeys(source_keys))
    needs: list[ModuleMatch] = []  # the matches that need bases, in order
    requests: list[Request] = []
    for skey in unique:
        sshape = source.shape(skey)
        m, n = matrix_shape(sshape)
        name_key = _name_pair(skey, source_index, target_index, target)
        by_name = config.pairing == "name" or parse_place(skey) is not None
        same_shape = name_key is not None and matrix_shape(target.shape(name_key)) == (m, n)
        match = matches[skey] = ModuleMatch(skey, None, name_key, config.rank_for(m, n))
        if config.mode == "copy" or skey in pair_only or len(sshape) < 2:
            match.basis_free = True
            match.target_key = name_key if same_shape else None
            match.reason = "" if same_shape else "target has no weight of that name and shape"
            continue
        if by_name and not same_shape:
            match.reason = "target has no weight of that name" if name_key is None else f"target weight has another shape {list(target.shape(name_key))}"
            continue
        needs.append(match)
        requests.append((source, skey, match.k))
        if by_name:
            requests.append((target, name_key, match.k))  # type: ignore[arg-type]
        else:
            requests += [(target, ckey, match.k) for ckey in candidates.get(candidate_class(skey, sshape), [])]
    n_requests = len({(id(w), key, k) for w, key, k in requests})
    total = n_requests + len(needs)
    provider.prefetch(requests, progress, total, check_interrupt)
    sketches = Sketches()
    for step, match in enumerate(needs):
        if check_interrupt is not None:
            check_interrupt()
        if progress is not None:
            progress(n_requests + step, total, match.source_key)
        skey = match.source_key
        match.source_basis = provider.get(source, skey, match.k)
        if config.pairing == "name" or parse_place(skey) is not None:
            match.target_key, match.target_basis = match.name_key, provider.get(target, match.name_key, match.k)  # type: ignore[arg-type]
            match.similarity = basis_similarity(match.source_basis, match.target_basis)
            continue
        keys = candidates.get(candidate_class(skey, source.shape(skey)), [])
        bases = [provider.get(target, ckey, match.k) for ckey in keys]
        for i in sketches.shortlist(match.source_basis, keys, bases, config.threshold):
            s = basis_similarity(match.source_basis, bases[i])
            if match.similarity is None or s.phi > match.similarity.phi:
                match.target_key, match.similarity, match.target_basis = keys[i], s, bases[i]
        match.reason = "" if match.target_key else "target has no weight of that shape"
    provider.stats.seconds = time.perf_counter() - t0
    return matches, provider.stats


class Sketches:
    """A cheap estimate of Φ for ranking similarity-pairing candidates.

    The signature of a basis ``U`` (``d × k``) is ``P_U R = U (Uᵀ R)`` for a seeded Gaussian ``R``
    (``d × s``, one per dimension ``d``): it depends on the subspace only, not on the basis chosen in
    it. Since ``E‖(P₁ − P₂) R‖_F² = s ‖P₁ − P₂‖_F² = 2 s k (1 − Φ)``, the estimate
    ``Φ̂ = 1 − ‖P₁R − P₂R‖_F² / (2 s k)`` is unbiased, with standard deviation at most
    ``1 / √(s k)`` (``Var(rᵀ D² r) = 2‖D²‖_F² ≤ 4k(1 − Φ)`` for ``D = P₁ − P₂``). ``s = max(16,
    ⌈1024 / k⌉)`` keeps that below 1/32; ranking all candidates costs one ``(m + n) s``-long dot
    product per pair instead of Φ's ``(m + n) k²`` flops.

    :meth:`shortlist` keeps the ``top`` best by ``min(Φ̂_U, Φ̂_V)`` and every candidate whose
    estimate reaches ``max(best exact Φ among those, threshold) − margin`` (margin: 4 standard
    deviations), so the candidate an exhaustive search would choose is kept whenever it passes the
    threshold; a module with no passing candidate gets the best of the shortlist (it does not
    transfer either way).
    """

    TOP = 3
    SIGMAS = 4.0

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._probes: dict[tuple[int, int, torch.dtype, torch.device], Tensor] = {}
        self._sig: dict[int, tuple[Basis, tuple[Tensor, Tensor]]] = {}  # id(basis) → (basis, signature): the basis is kept so the id stays its own
        self._stacks: dict[tuple[int, ...], list[tuple[Tensor, Tensor]]] = {}

    @staticmethod
    def columns(k: int) -> int:
        return max(16, -(-1024 // k))

    def margin(self, k: int) -> float:
        return self.SIGMAS / (self.columns(k) * k) ** 0.5

    def _probe(self, d: int, s: int, like: Tensor) -> Tensor:
        key = (d, s, like.dtype, like.device)
        if key not in self._probes:
            gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + d)
            self._probes[key] = torch.randn(d, s, generator=gen, dtype=torch.float64).to(device=like.device, dtype=like.dtype)
        return self._probes[key]

    def signature(self, basis: Basis) -> tuple[Tensor, Tensor]:
        """``(P_U R_m, P_V R_n)``, each flattened (``m·s`` and ``n·s`` long)."""
        hit = self._sig.get(id(basis))
        if hit is not None:
            return hit[1]
        s = self.columns(basis.k)
        sig = tuple((B @ (B.T @ self._probe(B.shape[0], s, B))).reshape(-1) for B in (basis.U, basis.V))
        self._sig[id(basis)] = (basis, sig)  # type: ignore[assignment]
        return sig  # type: ignore[return-value]

    def estimate(self, source: Basis, candidates: Sequence[Basis]) -> Tensor:
        """``min(Φ̂_U, Φ̂_V)`` of ``source`` against each candidate (same dims and k), a 1-D tensor."""
        key = tuple(id(b) for b in candidates)
        stack = self._stacks.get(key)
        if stack is None:
            sides = [torch.stack([self.signature(b)[side] for b in candidates]) for side in (0, 1)]  # C × m·s, C × n·s
            stack = self._stacks[key] = [(S, S.square().sum(-1)) for S in sides]
        norm = 2 * self.columns(source.k) * source.k
        phi = []
        for (S, sq), a in zip(stack, self.signature(source)):
            a = a.to(S.dtype)
            phi.append(1.0 - (a.square().sum() + sq - 2 * (S @ a)).clamp_min(0.0) / norm)
        return torch.minimum(phi[0], phi[1])

    def shortlist(self, source: Basis, keys: Sequence[str], bases: Sequence[Basis], threshold: float) -> list[int]:
        """Indices of the candidates whose exact Φ is worth computing, best estimate first."""
        if len(bases) <= self.TOP:
            return list(range(len(bases)))
        est = self.estimate(source, bases).tolist()
        order = sorted(range(len(bases)), key=lambda i: -est[i])
        top = order[: self.TOP]
        best = max(basis_similarity(source, bases[i]).phi for i in top)
        floor = max(best, threshold) - self.margin(source.k)
        return top + [i for i in order[self.TOP:] if est[i] >= floor]


def _name_pair(skey: str, source_index: BaseIndex, target_index: BaseIndex, target: WeightSource) -> str | None:
    """The target weight of the same name as ``skey``; for a slice, the same slice of it (``None``
    when the target's weight is too small to hold it)."""
    s = parse_place(skey)
    if s is None:
        return target_index.find_bare(source_index.bare_name(skey))
    base = target_index.find_bare(source_index.bare_name(s.key))
    return s.on(base).virtual_key if base is not None and s.fits(tuple(target.shape(base))) else None
