"""Pipeline bubble: measured idle fraction from compute timestamps, and the theory.

Theory (Narayanan et al. 2021, arXiv 2104.04473, sec. 2.2): with per-micro-batch forward
and backward times t_f, t_b on every stage, 1F1B (and GPipe) take (m + p - 1)(t_f + t_b)
for m(t_f + t_b) of work per stage, so the idle fraction of a stage is
    (p - 1) / (m + p - 1)                    (bubble/ideal ratio (p - 1)/m in the paper).
Interleaving v chunks per rank shrinks the bubble time by v (sec. 2.2.2: ratio
(p - 1)/(v m)), so the idle fraction becomes
    (p - 1) / (v m + p - 1).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

from .schedules import Action


class TimedAction(NamedTuple):
    action: Action
    start: float
    end: float


def theoretical_bubble(pp: int, m: int, vpp: int = 1) -> float:
    """Idle fraction of each stage: (p - 1) / (v m + p - 1)."""
    if pp < 1 or m < 1 or vpp < 1:
        raise ValueError(f"pp={pp}, m={m}, vpp={vpp}: all must be >= 1")
    return (pp - 1) / (vpp * m + pp - 1)


def busy_time(timeline: Sequence[TimedAction]) -> float:
    return sum(t.end - t.start for t in timeline if t.action.is_compute)


def common_window(timelines: Sequence[Sequence[TimedAction]]) -> tuple[float, float]:
    """[first compute start, last compute end] over all stages: the iteration as the
    pipeline sees it. Timestamps must share one clock (perf_counter on one host)."""
    starts = [t.start for tl in timelines for t in tl]
    ends = [t.end for tl in timelines for t in tl]
    if not starts:
        raise ValueError("empty timelines")
    return min(starts), max(ends)


def bubble_fraction(timelines: Sequence[Sequence[TimedAction]],
                    window: tuple[float, float] | None = None) -> list[float]:
    """Idle fraction of each stage's timeline within `window` (default: the common window
    of all given stages, so a late-starting stage counts its wait as bubble)."""
    start, end = window if window is not None else common_window(timelines)
    span = end - start
    if span <= 0:
        raise ValueError(f"window {window}: empty")
    return [1.0 - busy_time(tl) / span for tl in timelines]
