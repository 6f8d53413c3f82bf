"""One error type for everything the user can get wrong.

Every message names the file, the key (when there is one) and the reason, on one line, so the CLI
can print it as is and a ComfyUI node can raise it as a node error.
"""
from __future__ import annotations

from pathlib import Path


class ProLoRAError(Exception):
    """Bad input or a transfer that cannot be done. ``str(err)`` is the one-line message."""

    def __init__(self, reason: str, *, file: str | Path | None = None, key: str | None = None) -> None:
        self.reason = reason
        self.file = str(file) if file is not None else None
        self.key = key
        parts = []
        if self.file is not None:
            parts.append(self.file)
        if key is not None:
            parts.append(f"key '{key}'")
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {reason}" if prefix else reason)
