"""A shared check for the formats' parsers."""
from __future__ import annotations

from typing import Mapping

from torch import Tensor

from ..errors import ProLoRAError


def check_fits(cond: bool, what: str, shapes: Mapping[str, Tensor], where: str, key: str) -> None:
    """Refuse factors of format ``what`` that do not fit together, listing their shapes by suffix."""
    if not cond:
        shown = ", ".join(f"{s.removeprefix('.')} {list(t.shape)}" for s, t in shapes.items())
        raise ProLoRAError(f"{what} factors do not fit together: {shown}", file=where, key=key)
