"""Which measured plan to write: the user's objective over the plans inside the accuracy range.

The search measures a handful of plans for real (accuracy drop on held-back feeds, bytes of the
written model and, when the target is this machine, latency interleaved with fp32). This module
decides among them; it never measures anything itself.

* ``latency`` (the default): the fastest plan; plans within the measurement noise of the fastest
  count as equally fast and the smallest of them wins ("latency first, then size"). fp32 is
  always a contender at ratio 1.0, so a quantized plan slower than fp32 beyond the noise is never
  written under this objective.
* ``size``: the smallest written model inside the range, whatever its latency.
* ``balanced``: the smallest sum of latency ratio and size ratio (both relative to fp32).

Without measured latency (the target is not this machine), ``latency`` and ``balanced`` fall back
to the predicted order of the front (its cost model), which is what the plans were sorted by.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["Objective", "MeasuredPlan", "Choice", "choose", "NOISE_FLOOR"]

#: Latency ratios closer than this are not told apart (interleaved medians on a shared machine).
NOISE_FLOOR = 0.03


class Objective(StrEnum):
    LATENCY = "latency"
    SIZE = "size"
    BALANCED = "balanced"


@dataclass(frozen=True)
class MeasuredPlan:
    """One plan measured for real.

    Attributes:
        index: its position on the predicted front (ordered by predicted cost, fp32 last).
        drop: measured drop of the metric against fp32.
        size_ratio: bytes of its written model over the fp32 model's.
        latency_ratio: measured latency over fp32's (None when not measured).
        latency_spread: interquartile range of the per-round latency ratios.
        is_fp32: True for the unquantized plan.
    """

    index: int
    drop: float
    size_ratio: float
    latency_ratio: float | None = None
    latency_spread: float = 0.0
    is_fp32: bool = False


@dataclass(frozen=True)
class Choice:
    """The plan to write, and a sentence for the user when the range forced a compromise."""

    plan: MeasuredPlan
    notice: str | None = None


def _fastest_then_smallest(inside: Sequence[MeasuredPlan]) -> MeasuredPlan:
    timed = [p for p in inside if p.latency_ratio is not None]
    best = min(timed, key=lambda p: (p.latency_ratio, p.size_ratio, p.index))
    assert best.latency_ratio is not None
    tolerance = max(NOISE_FLOOR, best.latency_spread)
    tied = [p for p in timed if p.latency_ratio is not None and p.latency_ratio <= best.latency_ratio + tolerance]
    return min(tied, key=lambda p: (p.size_ratio, p.latency_ratio, p.index))


def choose(plans: Sequence[MeasuredPlan], max_drop: float, objective: Objective) -> Choice | None:
    """The plan that best serves ``objective`` among ``plans`` whose drop is inside ``max_drop``.

    Returns None when no plan is inside the range (the caller reports the shortfall).
    """
    inside = [p for p in plans if p.drop <= max_drop]
    if not inside:
        return None
    timed = all(p.latency_ratio is not None for p in inside)
    if objective is Objective.SIZE:
        chosen = min(inside, key=lambda p: (p.size_ratio, p.index))
    elif not timed:
        chosen = min(inside, key=lambda p: p.index)  # the front's predicted order
    elif objective is Objective.BALANCED:
        chosen = min(inside, key=lambda p: (float(p.latency_ratio or 0.0) + p.size_ratio, p.index))
    else:
        chosen = _fastest_then_smallest(inside)
    return Choice(chosen, _notice(inside, chosen, objective) if timed else None)


def _notice(inside: Sequence[MeasuredPlan], chosen: MeasuredPlan, objective: Objective) -> str | None:
    quantized = [p for p in inside if not p.is_fp32 and p.latency_ratio is not None]
    if not quantized:
        return None
    fastest = min(quantized, key=lambda p: float(p.latency_ratio or 0.0))
    ratio = float(fastest.latency_ratio or 0.0)
    if ratio < 1.0 - NOISE_FLOOR:
        return None
    if chosen.is_fp32:
        return (f"no quantized plan inside the range runs faster than fp32 on this machine (the fastest is "
                f"{ratio:.2f}x fp32): writing the fp32 plan, as --objective {objective.value} asks")
    return (f"no quantized plan inside the range runs faster than fp32 on this machine (the fastest is "
            f"{ratio:.2f}x fp32); --objective {objective.value} chose one at "
            f"{float(chosen.latency_ratio or 0.0):.2f}x latency and {chosen.size_ratio:.0%} of the fp32 size")
