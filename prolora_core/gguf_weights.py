"""Base-model weights stored as GGUF (city96's ComfyUI-GGUF convention), dequantized per tensor.

ComfyUI users run Flux, Wan and Qwen-Image as GGUF files (F16, Q8_0, Q6_K, Q5_K_M, Q4_K_M…). The
engine reads such a base through the ``gguf`` package (the reader and dequantizer of the GGML
project): the file is memory-mapped, and one tensor at a time is dequantized to float32 when the
engine asks for it, so at most one weight of the base is held in memory.

Names and shapes follow ComfyUI-GGUF's loader (``loader.gguf_sd_loader``):

* the key is the tensor's GGUF name, with ``model.diffusion_model.`` stripped when the file's
  names carry it;
* the shape is ``comfy.gguf.orig_shape.<name>`` (an INT32 array in the metadata) when the file has
  one, otherwise the GGUF shape reversed (GGUF lists dimensions fastest-first, ``ne[0]`` = columns).

A base read from a quantized file gives bases (and Φ) of the *dequantized* weights, which differ
from those of the full-precision weights by the quantization error; :attr:`GGUFWeights.quantized`
lists the quantization types so reports can say so.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import ProLoRAError
from .safetensors_io import check_readable_file
from .weights import content_key_of_bytes

#: The prefix ComfyUI-GGUF strips from tensor names (when any name carries it).
GGUF_PREFIX = "model.diffusion_model."
#: Types stored as plain floats, not block-quantized.
_FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


class GGUFWeights:
    """Module weights of a base model stored as GGUF; ``get`` returns float32 tensors.

    ``content_key`` hashes the raw (still quantized) bytes with the quantization type and the
    shape, so two files holding the same quantized weight share cached bases, and a Q8_0 and an
    F16 file of the same model do not.

    Raises :class:`ProLoRAError` naming the file when it is not a readable GGUF file, and the
    tensor when its type cannot be dequantized.
    """

    def __init__(self, path: str | Path, memo_dir: Path | None = None) -> None:
        import gguf  # the reader and dequantizer of the GGML project (requirements.txt)

        self.path = check_readable_file(path)
        self.label = self.path.name
        self._gguf = gguf
        try:
            self._reader = gguf.GGUFReader(str(self.path))
        except Exception as e:  # the reader raises ValueError/struct.error/IndexError on damaged files
            raise ProLoRAError(f"not a readable GGUF file ({type(e).__name__}: {e})", file=self.path) from None
        names = [t.name for t in self._reader.tensors]
        strip = any(n.startswith(GGUF_PREFIX) for n in names)
        self._tensors = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for t in self._reader.tensors:
            if strip and not t.name.startswith(GGUF_PREFIX):
                continue  # ComfyUI-GGUF drops these too (text encoder or VAE parts of a full checkpoint)
            key = t.name[len(GGUF_PREFIX):] if strip else t.name
            self._tensors[key] = t
            self._shapes[key] = self._orig_shape(t.name) or tuple(int(d) for d in reversed(t.shape))
        self.metadata: dict[str, str] = self._string_fields()
        self.quantized = sorted({t.tensor_type.name for t in self._tensors.values() if t.tensor_type.name not in _FLOAT_TYPES})

    def _orig_shape(self, name: str) -> tuple[int, ...] | None:
        field = self._reader.get_field(f"comfy.gguf.orig_shape.{name}")
        if field is None:
            return None
        types = self._gguf.GGUFValueType
        if len(field.types) != 2 or field.types[0] != types.ARRAY or field.types[1] != types.INT32:
            raise ProLoRAError(f"comfy.gguf.orig_shape metadata has types {[t.name for t in field.types]}, expected an INT32 array",
                               file=self.path, key=name)
        return tuple(int(field.parts[i][0]) for i in field.data)

    def _string_fields(self) -> dict[str, str]:
        """The file's string-valued metadata (``general.architecture``…), like a safetensors header's."""
        out: dict[str, str] = {}
        for name, field in self._reader.fields.items():
            if len(field.types) == 1 and field.types[0] == self._gguf.GGUFValueType.STRING:
                out[name] = bytes(field.parts[field.data[-1]]).decode("utf-8", "replace")
        return out

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def get(self, key: str) -> Tensor:
        """The weight dequantized to float32, in its ComfyUI shape ([out, in] or [out, in, kh, kw])."""
        t = self._tensors[key]
        try:
            values = self._gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ProLoRAError(f"GGUF type {t.tensor_type.name} cannot be dequantized by the installed gguf package",
                               file=self.path, key=key) from None
        shape = self._shapes[key]
        if values.size != int(np.prod(shape)):
            raise ProLoRAError(f"{values.size} values for a tensor of shape {list(shape)}", file=self.path, key=key)
        return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))  # a copy: the file stays mapped read-only

    def content_key(self, key: str) -> str:
        t = self._tensors[key]
        return content_key_of_bytes(memoryview(np.ascontiguousarray(t.data).reshape(-1).view(np.uint8)), f"gguf:{t.tensor_type.name}",
                                    self._shapes[key])

    def save_memo(self) -> None:
        """Nothing to persist: content keys of a memory-mapped file are hashed on demand."""
