"""On-disk cache of bases, keyed by a weight's content and by every setting that changes a basis.

Layout: ``<root>/bases/<settings key>/<aa>/<content key>.safetensors`` holding ``U``, ``V`` (in
``BasisSettings.stored_dtype``: the compute dtype, or float16 / bfloat16 when ``cache_dtype`` says so;
the settings key names it, so an entry of one dtype is never served for another), ``S`` (compute
dtype) and metadata with a checksum of the three tensors. An entry is served for any k up to
the one it holds. A corrupt, truncated or stale entry (checksum, shapes or settings disagree) is
deleted and recomputed. Writes go to a temporary file that is then renamed into place, so readers
never see a partial entry and two processes may fill the cache at once (the last rename wins, and
both entries are equal). A hit touches the entry's mtime, so :meth:`BasisCache.evict` can drop the
least recently used entries when the cache outgrows a size limit.

Full thin SVDs (mode ``casa``, :mod:`.full_bases`) are a separate entry kind under
``<root>/full/<full key>/<aa>/<content key>.safetensors`` (``U``, ``S``, ``V`` exact, in their compute
dtype; format ``prolora-full-basis-1``; the full key names the compute dtype and device kind). They
share the checksum, atomic write and LRU touch with the top-k bases and are evicted before them
(:meth:`BasisCache.evict`), but live in another folder with another format marker and are read only by :meth:`BasisCache.load_full`,
so neither kind is ever served for the other.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from .basis import Basis, BasisSettings
from .safetensors_io import atomic_save

log = logging.getLogger("prolora")
ENTRY_FORMAT = "prolora-basis-1"
FULL_ENTRY_FORMAT = "prolora-full-basis-1"
#: Default size limit of the cache (GB = 2**30 bytes): the bases of about four SDXL-size model pairs.
DEFAULT_MAX_GB = 4.0


def default_cache_dir() -> Path:
    """``$PROLORA_CACHE_DIR``, else the platform's user cache folder + ``/prolora``."""
    env = os.environ.get("PROLORA_CACHE_DIR")
    if env:
        return Path(env)
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "prolora" / "cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "prolora"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "prolora"


def _checksum(*tensors: torch.Tensor) -> str:
    h = xxhash.xxh3_128()
    for t in tensors:
        # ``contiguous()`` may keep odd strides on size-1 dims (a k = 1 basis), which ``view`` refuses; the
        # flat ``reshape`` of a contiguous tensor is a stride-1 view, so no copy is made (a copy of every
        # tensor was ~15 % of a warm run: bench/bench_transfer.py). Same bytes, same digest.
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    rebuilt: int = 0


class BasisCache:
    """Bases on disk under ``root`` for one :class:`BasisSettings`."""

    def __init__(self, root: str | Path, settings: BasisSettings) -> None:
        self.root = Path(root)
        self.settings = settings
        self.folder = self.root / "bases" / settings.key()
        self.stats = CacheStats()
        self._write_failed = False  # after one failed write, stop trying (and warning) for this run

    @property
    def memo_dir(self) -> Path:
        return self.root / "files"

    def _path(self, content_key: str) -> Path:
        return self.folder / content_key[:2] / f"{content_key}.safetensors"

    def _full_path(self, content_key: str, full_key: str) -> Path:
        return self.root / "full" / full_key / content_key[:2] / f"{content_key}.safetensors"

    def load_full(self, content_key: str, full_key: str, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The cached full thin SVD ``(U, S, V)`` of an ``m × n`` weight (``U`` ``m × d``, ``S`` ``d``, ``V``
        ``n × d``, ``d = min(m, n)``, exactly as stored) under ``full_key`` (:func:`.full_bases.full_key`),
        or ``None``; a corrupt or stale entry is removed (counted in ``stats.rebuilt``)."""
        path = self._full_path(content_key, full_key)
        if not path.exists():
            return None
        m, n = shape
        d = min(m, n)
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                U, S, V = f.get_tensor("U"), f.get_tensor("S"), f.get_tensor("V")
            ok = (meta.get("format") == FULL_ENTRY_FORMAT and meta.get("full_key") == full_key and meta.get("content_key") == content_key
                  and tuple(U.shape) == (m, d) and tuple(S.shape) == (d,) and tuple(V.shape) == (n, d)
                  and U.dtype == S.dtype == V.dtype and meta.get("checksum") == _checksum(U, S, V))
        except Exception as e:  # any unreadable entry is treated as corrupt
            ok = False
            log.warning("prolora: full basis cache entry %s is unreadable (%s); recomputing", path, e)
        if not ok:
            self.stats.rebuilt += 1
            path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)
        except OSError:
            pass
        return U, S, V

    def store_full(self, content_key: str, full_key: str, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> None:
        """Publish a full thin SVD atomically, exact (best effort, as :meth:`store`)."""
        if self._write_failed:
            return
        U, S, V = (t.detach().to("cpu").contiguous() for t in (U, S, V))
        meta = {"format": FULL_ENTRY_FORMAT, "full_key": full_key, "content_key": content_key, "checksum": _checksum(U, S, V)}
        self._publish(self._full_path(content_key, full_key), U, S, V, meta)

    def load(self, content_key: str, k: int, shape: tuple[int, ...]) -> Basis | None:
        """The cached basis truncated to ``k``, or ``None`` (a bad entry is removed)."""
        path = self._path(content_key)
        if not path.exists():
            self.stats.misses += 1
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                U, S, V = f.get_tensor("U"), f.get_tensor("S"), f.get_tensor("V")
            info = json.loads(meta["info"])
            ok = (
                meta.get("format") == ENTRY_FORMAT
                and meta.get("settings") == self.settings.key()
                and meta.get("content_key") == content_key
                and tuple(info["shape"]) == tuple(shape)
                and U.ndim == 2 and V.ndim == 2 and S.ndim == 1
                and U.shape[1] == V.shape[1] == S.shape[0]
                and U.dtype == V.dtype == self.settings.stored_dtype
                and meta.get("checksum") == _checksum(U, S, V)
            )
        except Exception as e:  # any unreadable entry is treated as corrupt
            ok, info = False, {}
            log.warning("prolora: basis cache entry %s is unreadable (%s); recomputing", path, e)
        if not ok:
            self.stats.rebuilt += 1
            path.unlink(missing_ok=True)
            return None
        if U.shape[1] < k:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        try:
            os.utime(path)  # recently used: evicted last
        except OSError:
            pass  # a read-only cache still serves
        dt = self.settings.compute_dtype  # held values, widened back: equal to a fresh basis (basis.held_as)
        basis = Basis(U.to(dt), S.to(dt), V.to(dt), tuple(info["shape"]), info["method"], int(info["iterations"]), float(info["subspace_change"]),
                      float(info.get("uncertainty", 0.0)))
        return basis.truncate(k)

    def store(self, content_key: str, basis: Basis) -> None:
        """Publish ``basis`` atomically (best effort: a read-only cache folder logs one warning per run)."""
        if self._write_failed:
            return
        path = self._path(content_key)
        held = self.settings.stored_dtype
        U, S, V = (t.detach().to("cpu", dt).contiguous() for t, dt in ((basis.U, held), (basis.S, basis.S.dtype), (basis.V, held)))
        info = {"shape": list(basis.shape), "method": basis.method, "iterations": basis.iterations, "subspace_change": basis.subspace_change,
                "uncertainty": basis.uncertainty}
        meta = {"format": ENTRY_FORMAT, "settings": self.settings.key(), "content_key": content_key,
                "checksum": _checksum(U, S, V), "info": json.dumps(info, sort_keys=True)}
        self._publish(path, U, S, V, meta)

    def _publish(self, path: Path, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, meta: dict[str, str]) -> None:
        """Write one entry atomically; the first failure (read-only folder, full disk) turns storing
        off for the rest of the run with one warning."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_save({"U": U, "S": S, "V": V}, path, meta)
        except OSError as e:
            self._write_failed = True
            log.warning("prolora: cannot write to the basis cache (%s); this run continues without storing bases", e)

    def evict(self, max_bytes: int) -> int:
        """Remove bases until they take at most ``max_bytes``: full SVDs first (mode ``casa``; ``d / k`` times
        the bytes of a top-k basis of the same weight), then top-k bases (all settings), least
        recently used first within each kind; returns how many were removed. An entry another process
        removes first is skipped."""
        entries = []
        for kind, folder in ((0, self.root / "full"), (1, self.root / "bases")):
            for p in folder.rglob("*.safetensors"):
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                entries.append((kind, max(st.st_mtime_ns, st.st_atime_ns), st.st_size, p))
        entries.sort()
        size = sum(e[2] for e in entries)
        removed = 0
        for _, _, nbytes, p in entries:
            if size <= max_bytes:
                break
            p.unlink(missing_ok=True)
            size -= nbytes
            removed += 1
        return removed

    def size_bytes(self) -> int:
        total = 0
        for p in self.root.rglob("*"):
            try:
                total += p.stat().st_size if p.is_file() else 0
            except FileNotFoundError:  # removed by another process meanwhile
                continue
        return total

    def entries(self) -> int:
        """How many bases the cache holds (all settings)."""
        return sum(1 for _ in (self.root / "bases").rglob("*.safetensors"))

    def full_entries(self) -> int:
        """How many full thin SVDs (mode ``casa``) the cache holds."""
        return sum(1 for _ in (self.root / "full").rglob("*.safetensors"))

    def limit(self, max_gb: float) -> int:
        """:meth:`evict` to ``max_gb`` GB (2**30 bytes); ``max_gb`` must not be negative."""
        if max_gb < 0:
            raise ValueError(f"cache size limit must not be negative, got {max_gb}")
        return self.evict(int(max_gb * 2**30))

    def describe(self, max_gb: float | None = None) -> str:
        """``basis cache: 1.02 GB in 412 bases (limit 4 GB) at <root>`` (MB below 1 GB) for node and CLI output."""
        size = self.size_bytes()
        shown = f"{size / 2**30:.2f} GB" if size >= 2**30 else f"{size / 2**20:.1f} MB"
        limit = "" if max_gb is None else f" (limit {max_gb:g} GB)"
        full = self.full_entries()
        more = f" and {full} full bases" if full else ""
        return f"basis cache: {shown} in {self.entries()} bases{more}{limit} at {self.root}"

    def clear(self) -> int:
        """Remove the cache's own files only — base entries (``bases/**/*.safetensors`` and
        ``full/**/*.safetensors``, with their temp files) and file-key memos (``files/*.json``) — and the folders they leave empty; any
        other file under ``root`` stays. Returns how many files were removed."""
        removed = 0
        for pattern, folder in (("*.safetensors", self.root / "bases"), ("*.tmp", self.root / "bases"), ("*.safetensors", self.root / "full"),
                                ("*.tmp", self.root / "full"), ("*.json", self.memo_dir)):
            for p in folder.rglob(pattern) if folder.is_dir() else ():
                p.unlink(missing_ok=True)
                removed += 1
        for folder in (self.root / "bases", self.root / "full", self.memo_dir):
            if folder.is_dir():
                for d in sorted((d for d in folder.rglob("*") if d.is_dir()), key=lambda d: len(d.parts), reverse=True) + [folder]:
                    try:
                        d.rmdir()
                    except OSError:  # not empty: holds something that is not ours
                        pass
        return removed
