"""Where a transferred LoRA is written: next to its input, named after the target, never over an
existing file unless asked (a numbered suffix instead)."""
from __future__ import annotations

from pathlib import Path

from .errors import ProLoRAError

#: ``{lora}``: the input LoRA's file name without extension; ``{target}``/``{source}``: the base
#: files' names likewise; ``{mode}``: the projection mode.
DEFAULT_PATTERN = "{lora}__to_{target}"
_FIELDS = ("lora", "target", "source", "mode")


def _stem(name: str) -> str:
    return name.removesuffix(".safetensors")


def output_stem(pattern: str, lora: str | Path, target: str, source: str = "", mode: str = "") -> str:
    """The output file name (no extension) from ``pattern``.

    ``output_stem("{lora}__to_{target}", "ink.safetensors", "ssd-1b.safetensors")`` →
    ``ink__to_ssd-1b``. Raises :class:`ProLoRAError` for an unknown field, an empty name or a
    name that would leave the folder (``/``, ``\\``, ``..``)."""
    values = {"lora": _stem(Path(lora).name), "target": _stem(Path(target).name), "source": _stem(Path(source).name), "mode": mode}
    try:
        stem = pattern.format(**values)
    except (KeyError, IndexError, ValueError) as e:
        raise ProLoRAError(f"bad file name pattern {pattern!r} ({type(e).__name__}: {e}); fields: {', '.join('{' + f + '}' for f in _FIELDS)}") from None
    stem = _stem(stem.strip())
    if not stem or "/" in stem or "\\" in stem or stem in (".", "..") or stem.startswith("."):
        raise ProLoRAError(f"file name pattern {pattern!r} gives {stem!r}, which is not a plain file name")
    return stem


def free_path(folder: Path, stem: str) -> Path:
    """``folder/stem.safetensors``, or ``stem_2``, ``stem_3`` … when that exists."""
    path, n = folder / f"{stem}.safetensors", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}_{n}.safetensors"
    return path
