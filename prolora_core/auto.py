"""Mode ``auto``: ``casa``, the update copied unchanged, or nothing, chosen for a whole LoRA from how
related the target is and how far it has moved from the source.

For every module that passes the Φ filter the relative departure is

    rel = ‖W_t − W_s‖_F / ‖W_s‖_F            (W_s, W_t: the paired source and target weights, m × n)

and one choice is made for all modules of the LoRA:

1. fewer than half of the LoRA's paired modules pass Φ: the target looks unrelated, **nothing** is
   transferred (every module reported "below threshold"), as the Φ filter does for a stranger;
2. median ``rel`` over the passing modules ``≤`` :data:`AUTO_MAX_DEPARTURE` (0.13): ``casa``
   (:mod:`.casa`) on every passing module: the target is the source plus a moderate departure (a
   fine-tune, a pruned-and-distilled or a few-step distilled descendant), where writing
   ``C_s − C_d`` puts source + LoRA behaviour back;
3. otherwise ``copy``: the source update unchanged on every paired module, Φ or not (what loading the
   LoRA does): the target has moved so far that restoring source behaviour no longer helps.

Evidence (tiny-UNet zoo, evidence/results.md "Mode `auto`"): median ``rel`` is 0.036 on the gentle
fine-tune, 0.039 on the turbo, 0.071 on the pruned B, 0.098 on descendant A, 0.16 on the
shared-init control and 0.20 on the nearer ladder rung; ``casa`` beats Copy on the first four and
loses to it on the others, where Copy (unfiltered: the few modules Φ drops there carry much of the
style LoRA's effect) is best. The unrelated C passes 0/84 modules, the far ladder rung 21/84.
Choosing per module instead (casa where a module's own ``rel`` is small) kept only a fraction of
``casa``'s gain on descendant A, so the choice is made once per LoRA.
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

AutoChoice = Literal["casa", "copy", "none"]


def relative_departure(w_source: Tensor, w_target: Tensor) -> float:
    """``‖W_t − W_s‖_F / ‖W_s‖_F`` in float64 (any shapes with equal entry count; ``inf`` for a zero ``W_s``)."""
    ws = w_source.detach().double().reshape(-1)
    d = w_target.detach().double().reshape(-1) - ws
    den = float(ws.norm())
    return float(d.norm()) / den if den > 0 else math.inf


def choose(departures: list[float], paired: int, max_departure: float = AUTO_MAX_DEPARTURE) -> tuple[AutoChoice, float]:
    """The choice for a whole LoRA and its median departure: ``departures`` of the modules that pass
    Φ, ``paired`` the number of its modules with a target weight (passing or not)."""
    med = float(statistics.median(departures)) if departures else math.nan
    if not departures or 2 * len(departures) < paired:
        return "none", med
    return ("casa" if med <= max_departure else "copy"), med


def reason(choice: AutoChoice, median: float, rel: float | None, passing: int, paired: int,
           max_departure: float = AUTO_MAX_DEPARTURE) -> str:
    """One line for a module's report: what ``auto`` did and why (``rel``: this module's departure,
    ``None`` when it did not pass Φ)."""
    if choice == "none":
        return f"below threshold (auto: only {passing}/{paired} modules pass Φ, the target looks unrelated)"
    cmp = "≤" if choice == "casa" else ">"
    own = f"this module's {rel:.3f}" if rel is not None else "this module below Φ"
    return f"transferred (auto: {choice}; median departure {median:.3f} {cmp} {max_departure:g}, {own})"
