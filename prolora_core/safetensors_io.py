"""Checked reading and atomic writing of safetensors files.

Every failure becomes a :class:`ProLoRAError` naming the file and the reason. Pickle-based files
(``.pt``, ``.ckpt``, ``.bin``, ``.pth``) are refused without being unpickled.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save

from .errors import ProLoRAError

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
_MAX_HEADER = 100 * 1024 * 1024
_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in the header: dtype string (``F16``…), shape, absolute byte range in the file."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class Header:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    header_bytes: bytes


def check_readable_file(path: str | Path) -> Path:
    """The path as a :class:`Path`, or a clear error when it is missing, a folder or unreadable."""
    p = Path(path)
    if not p.exists():
        raise ProLoRAError("file not found", file=p)
    if p.is_dir():
        raise ProLoRAError("is a folder, expected a .safetensors file", file=p)
    if not os.access(p, os.R_OK):
        raise ProLoRAError("file is not readable (permission denied)", file=p)
    return p


def read_header(path: str | Path) -> Header:
    """Parse and validate a safetensors header without loading any tensor."""
    p = check_readable_file(path)
    if p.suffix.lower() == ".gguf":
        raise ProLoRAError("GGUF files cannot be read here: only safetensors are (convert the model to .safetensors first)", file=p)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise ProLoRAError(f"'{p.suffix}' files are pickles and are never unpickled here; convert it to .safetensors first", file=p)
    size = p.stat().st_size
    if size == 0:
        raise ProLoRAError("file is empty", file=p)
    try:
        with open(p, "rb") as fh:
            head = fh.read(8)
            if head[:4] == b"GGUF":
                raise ProLoRAError("is a GGUF file, which cannot be read here: only safetensors are (convert it to .safetensors first)", file=p)
            if len(head) < 8:
                raise ProLoRAError("not a safetensors file (shorter than its 8-byte header length)", file=p)
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or n + 8 > size:
                if head[:2] == b"PK" or head[:1] == b"\x80":
                    raise ProLoRAError("looks like a pickle/zip checkpoint, which is never unpickled here; convert it to .safetensors", file=p)
                raise ProLoRAError(f"not a safetensors file (header length {n} does not fit a {size}-byte file)", file=p)
            raw = fh.read(n)
    except OSError as e:
        raise ProLoRAError(f"cannot read file: {e.strerror or e}", file=p) from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise ProLoRAError(f"corrupt safetensors header ({e})", file=p) from None
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise ProLoRAError("corrupt safetensors header (__metadata__ is not an object)", file=p)
    base = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        try:
            dtype, shape, (a, b) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ProLoRAError("corrupt safetensors header (bad tensor entry)", file=p, key=key) from None
        count = 1
        for d in shape:
            count *= d
        if base + b > size:
            raise ProLoRAError(f"file is truncated: the tensor's data ends at byte {base + b} of a {size}-byte file", file=p, key=key)
        if dtype in _DTYPE_SIZES and b - a != count * _DTYPE_SIZES[dtype]:
            raise ProLoRAError(f"corrupt safetensors header: {b - a} bytes for a {dtype} tensor of shape {list(shape)}", file=p, key=key)
        tensors[key] = TensorInfo(dtype, shape, base + a, base + b)
    return Header(p, tensors, {str(k): str(v) for k, v in meta.items()}, raw)


class SafetensorsReader:
    """Lazy access to one checked safetensors file: tensors are read one at a time (``safe_open``)."""

    def __init__(self, path: str | Path) -> None:
        self.header = read_header(path)
        self.path = self.header.path
        try:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise ProLoRAError(f"not a readable safetensors file ({e})", file=self.path) from None

    def keys(self) -> list[str]:
        return list(self.header.tensors)

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._handle.get_tensor(key)
        except Exception as e:
            raise ProLoRAError(f"cannot read tensor ({e})", file=self.path, key=key) from None

    def raw_bytes(self, key: str) -> bytes:
        info = self.header.tensors[key]
        with open(self.path, "rb") as fh:
            fh.seek(info.start)
            return fh.read(info.end - info.start)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for k in self.keys():
            yield k, self.get(k)


def check_output_path(out: str | Path, inputs: list[str | Path] = ()) -> Path:  # type: ignore[assignment]
    """Refuse an output path whose folder is missing or read-only, or that is one of the inputs."""
    p = Path(out)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ProLoRAError(f"output folder {parent.name} is a file" if parent.exists() else "output folder does not exist", file=p)
    if not os.access(parent, os.W_OK):
        raise ProLoRAError("output folder is not writable", file=p)
    if p.is_dir():
        raise ProLoRAError("output path is a folder", file=p)
    for i in inputs:
        if Path(i).exists() and p.exists() and p.resolve() == Path(i).resolve():
            raise ProLoRAError("output path is one of the input files; choose another name", file=p)
        if p.resolve() == Path(i).resolve():
            raise ProLoRAError("output path is one of the input files; choose another name", file=p)
    return p


def atomic_write(path: str | Path, data: bytes | Sequence[bytes | memoryview]) -> None:
    """Write ``data`` (bytes, or parts written one after the other) to a temporary file in the same
    folder, then rename it over ``path``: never half-written."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent if str(p.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as fh:
            for part in ((data,) if isinstance(data, bytes) else data):
                fh.write(part)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a saved LoRA gets the usual permissions
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save a safetensors file atomically (see :func:`atomic_write`), byte-identical for equal inputs."""
    atomic_write(path, canonical_safetensors_parts(tensors, metadata))


def canonical_safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file whose header is sorted JSON, so equal inputs give byte-identical files.

    ``safetensors`` itself writes ``__metadata__`` in hash-map order, which changes from one
    process to the next; the tensor data (and its order) is kept exactly as it serialises it.
    """
    return b"".join(canonical_safetensors_parts(tensors, metadata))


def canonical_safetensors_parts(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> tuple[bytes, memoryview]:
    """:func:`canonical_safetensors_bytes` as (length + sorted header, a view of the tensor data):
    written one after the other they are that file, without copying the data again."""
    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    (n,) = struct.unpack("<Q", data[:8])
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    header += b" " * (-len(header) % 8)  # the format pads the header with spaces to 8-byte alignment
    return struct.pack("<Q", len(header)) + header, memoryview(data)[8 + n :]
