"""Mode ``auto``: ``casa`` or the update copied unchanged, chosen for a whole LoRA from how far the
target has moved from the source.

For every module that passes the Φ filter (as in every projecting mode) the relative departure is

    rel = ‖W_t − W_s‖_F / ‖W_s‖_F            (W_s, W_t: the paired source and target weights, m × n)

and the LoRA's median departure decides for all of its modules:

* median ``rel ≤`` :data:`AUTO_MAX_DEPARTURE` (0.13): ``casa`` (:mod:`.casa`) on every module: the
  target is the source plus a moderate departure (a fine-tune, a pruned-and-distilled or a few-step
  distilled descendant), where writing ``C_s − C_d`` puts source + LoRA behaviour back;
* otherwise the source update unchanged on its paired target module (``copy``, kept behind the Φ
  filter): the target has moved so far that restoring source behaviour no longer helps the LoRA.

Evidence (tiny-UNet zoo, evidence/results.md "Mode `auto`"): median ``rel`` is 0.036 on the gentle
fine-tune, 0.039 on the turbo, 0.071 on the pruned B, 0.098 on descendant A, 0.16 on the
shared-init control and 0.20 / 0.31 on the ladder rungs; ``casa`` beats Copy on the first four and
loses to it on the others. Choosing per module instead (casa where a module's own ``rel`` is small)
kept only a fraction of ``casa``'s gain on descendant A, so the choice is made once per LoRA.
"""
from __future__ import annotations

import math
import statistics
from typing import Literal

import torch
from torch import Tensor

#: Largest median relative departure at which ``auto`` uses ``casa`` (between descendant A, 0.098,
#: and the shared-init control, 0.16, on the zoo).
AUTO_MAX_DEPARTURE = 0.13

AutoChoice = Literal["casa", "copy"]


def relative_departure(w_source: Tensor, w_target: Tensor) -> float:
    """``‖W_t − W_s‖_F / ‖W_s‖_F`` in float64 (any shapes with equal entry count; ``inf`` for a zero ``W_s``)."""
    ws = w_source.detach().double().reshape(-1)
    d = w_target.detach().double().reshape(-1) - ws
    den = float(ws.norm())
    return float(d.norm()) / den if den > 0 else math.inf


def choose(departures: list[float], max_departure: float = AUTO_MAX_DEPARTURE) -> tuple[AutoChoice, float]:
    """The mode for a whole LoRA and its median departure (``nan`` and ``copy`` when no module passed)."""
    if not departures:
        return "copy", math.nan
    med = float(statistics.median(departures))
    return ("casa" if med <= max_departure else "copy"), med


def reason(choice: AutoChoice, median: float, rel: float, max_departure: float = AUTO_MAX_DEPARTURE) -> str:
    """One line for a module's report: what ``auto`` did and why."""
    cmp = "≤" if choice == "casa" else ">"
    return f"transferred (auto: {choice}; median departure {median:.3f} {cmp} {max_departure:g}, this module's {rel:.3f})"
