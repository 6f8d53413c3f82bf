"""Where module weights come from: a protocol, its safetensors-file implementation, and
:func:`open_weights`, which opens a base file of either kind (safetensors or GGUF).

The engine reads one module weight at a time through :class:`WeightSource`, so two full models
are never held in memory. ``content_key`` identifies a weight's bytes (dtype and shape included)
for the basis cache.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
import xxhash
from torch import Tensor

from .errors import ProLoRAError
from .safetensors_io import SafetensorsReader

if TYPE_CHECKING:
    from .gguf_weights import GGUFWeights


class WeightSource(Protocol):
    """A model's module weights, read lazily."""

    label: str

    def keys(self) -> list[str]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def get(self, key: str) -> Tensor: ...

    def content_key(self, key: str) -> str: ...


def content_key_of_bytes(data: bytes | memoryview, dtype: str, shape: tuple[int, ...]) -> str:
    """xxh3-128 of the raw bytes, with dtype and shape: equal keys mean equal weights."""
    h = xxhash.xxh3_128()
    h.update(f"{dtype}:{list(shape)}:".encode())
    h.update(data)
    return h.hexdigest()


def content_key_of_tensor(t: Tensor) -> str:
    """:func:`content_key_of_bytes` of an in-memory tensor (any dtype)."""
    flat = t.detach().cpu().clone(memory_format=torch.contiguous_format).reshape(-1)
    return content_key_of_bytes(flat.view(torch.uint8).numpy().data, str(t.dtype).removeprefix("torch."), tuple(t.shape))


def _read_memo(path: Path) -> dict[str, str]:
    """Remembered content keys, or ``{}`` when the memo is missing, unreadable or malformed."""
    try:
        memo = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(memo, dict) or not all(isinstance(k, str) and isinstance(v, str) and len(v) == 32 for k, v in memo.items()):
        return {}
    return memo


class SafetensorsWeights:
    """Module weights of a base model stored as safetensors (``<module>.weight`` keys).

    Content keys hash the tensor's bytes on disk. With ``memo_dir`` set, the keys of a file are
    remembered under its identity (path, size, mtime, inode) and re-used while that identity and
    a hash of the file's header still match, so a warm run hashes no weights.
    """

    def __init__(self, path: str | Path, memo_dir: Path | None = None) -> None:
        self.reader = SafetensorsReader(path)
        self.path = self.reader.path
        self.label = self.path.name
        self._memo_path: Path | None = None
        self._memo: dict[str, str] = {}
        self._memo_dirty = False
        if memo_dir is not None:
            st = self.path.stat()
            # ctime too: a rewrite that restores the old mtime (``touch -r``, ``os.utime``) still changes it.
            ident = (f"{self.path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}|"
                     f"{xxhash.xxh3_128_hexdigest(self.reader.header.header_bytes)}")
            self._memo_path = memo_dir / f"{xxhash.xxh3_128_hexdigest(ident.encode())}.json"
            self._memo = _read_memo(self._memo_path)

    @property
    def metadata(self) -> dict[str, str]:
        """The file's ``__metadata__`` strings."""
        return self.reader.header.metadata

    def keys(self) -> list[str]:
        return self.reader.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.reader.header.tensors[key].shape

    def get(self, key: str) -> Tensor:
        """The weight; an fp8 weight dequantized to float32 (times its scale, when it has one)."""
        t = self.reader.get(key)
        if not torch.is_floating_point(t):
            raise ProLoRAError(f"base weight has dtype {t.dtype}; integer bases are not supported (floating point and fp8 are)",
                               file=self.path, key=key)
        if t.element_size() > 1:
            return t
        scale_key = self.scale_key(key)
        if scale_key is None:
            return t.float()
        scale = self.reader.get(scale_key)
        if scale.numel() != 1 or not torch.is_floating_point(scale):
            raise ProLoRAError(f"fp8 scale of shape {list(scale.shape)} dtype {scale.dtype}; only one scalar scale per weight is supported",
                               file=self.path, key=scale_key)
        return t.float() * scale.float().reshape(())

    def scale_key(self, key: str) -> str | None:
        """The scale of a scaled-fp8 weight (ComfyUI's ``<module>.scale_weight``, or the newer
        ``<module>.weight_scale``), when the file has one."""
        module = key.removesuffix(".weight")
        for name in (f"{module}.scale_weight", f"{module}.weight_scale"):
            if name in self.reader.header.tensors:
                return name
        return None

    def content_key(self, key: str) -> str:
        if key not in self._memo:
            info = self.reader.header.tensors[key]
            data, dtype = self.reader.raw_bytes(key), info.dtype
            scale_key = self.scale_key(key) if info.dtype.startswith("F8") else None
            if scale_key is not None:  # the scale is part of the weight
                data += self.reader.raw_bytes(scale_key)
                dtype += "*" + self.reader.header.tensors[scale_key].dtype
            self._memo[key] = content_key_of_bytes(data, dtype, info.shape)
            self._memo_dirty = True
        return self._memo[key]

    def save_memo(self) -> None:
        """Persist the remembered content keys (atomic; best effort: a read-only cache is fine)."""
        if self._memo_path is None or not self._memo_dirty:
            return
        try:
            self._memo_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._memo_path.with_name(f".{self._memo_path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self._memo, sort_keys=True))
            os.replace(tmp, self._memo_path)
            self._memo_dirty = False
        except OSError:
            pass


def open_weights(path: str | Path, memo_dir: Path | None = None) -> SafetensorsWeights | GGUFWeights:
    """The base file at ``path`` as a :class:`WeightSource`, chosen by its extension: ``.gguf``
    (ComfyUI-GGUF's convention, dequantized per tensor: :class:`~.gguf_weights.GGUFWeights`) or
    safetensors (:class:`SafetensorsWeights`, which refuses pickles and mislabelled files clearly).
    ``memo_dir`` remembers safetensors content keys between runs."""
    if Path(path).suffix.lower() == ".gguf":
        from .gguf_weights import GGUFWeights

        return GGUFWeights(path, memo_dir)
    return SafetensorsWeights(path, memo_dir)
