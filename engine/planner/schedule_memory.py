"""How many micro-batches' activations a pipeline rank holds at its peak.

Closed forms of the engine's schedules (engine/pipeline/schedules.py), equal to the peak
of (forwards done - backwards done) in their action lists (checked in the tests):
- GPipe: all m micro-batches;
- 1F1B: rank r runs pp - r - 1 warm-up forwards and one more before its first backward,
  so it holds min(pp - r, m) (Narayanan et al. 2021, arXiv 2104.04473, sec. 2.2);
- interleaved 1F1B: Megatron's 2(pp - r - 1) + (vpp - 1)·pp warm-up forwards plus one,
  each of one chunk; forward k runs on virtual stage (k mod pp·vpp) // pp.
"""
from __future__ import annotations

from functools import lru_cache

from engine.pipeline.schedules import interleaved_warmup


@lru_cache(maxsize=65536)
def in_flight_per_chunk(schedule: str, pp: int, vpp: int, m: int, rank: int) -> tuple[int, ...]:
    """Micro-batches held at the peak for each of the rank's vpp chunks (virtual-stage order)."""
    if pp == 1:
        return (1,) * vpp         # one micro-batch at a time: backward right after forward
    if schedule == "gpipe":
        return (m,) * vpp
    if vpp == 1:
        return (min(pp - rank, m),)
    held = min(interleaved_warmup(pp, vpp, m, rank) + 1, m * vpp)
    full_rounds, rest = divmod(held, pp * vpp)
    return tuple(full_rounds * pp + min(max(rest - v * pp, 0), pp) for v in range(vpp))


def schedule_name(requested: str, vpp: int) -> str:
    """The schedule the trainer runs (engine/train/pipeline_setup.py): vpp > 1 interleaves."""
    return "interleaved" if vpp > 1 else requested
