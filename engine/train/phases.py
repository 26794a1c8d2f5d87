"""The phases of one training step and the mesh axes each phase communicates over, for
whoever watches a rank's progress (the worker's heartbeat, workers/heartbeat.py).

Pure arithmetic on the ParallelConfig: an axis of size 1 has no collective. Inside forward
and backward the collective in flight is one of several (TP gathers, CP ring, the EP
all-to-all, PP send/recv), so those phases name every axis their collectives may use.
Axes are named by their traffic kind (engine/parallel/traffic.py: dp, ep, tp, cp, pp).
"""
from __future__ import annotations

from typing import Callable

from engine.parallel.config import ParallelConfig

# (phase, axes of its collectives); called by the Trainer at every phase change
PhaseListener = Callable[[str, tuple[str, ...]], None]


def phase_axes(config: ParallelConfig) -> dict[str, tuple[str, ...]]:
    c = config
    model = tuple(kind for kind, size in (("tp", c.tp), ("cp", c.cp), ("ep", c.ep * c.etp),
                                          ("pp", c.pp)) if size > 1)
    grads = ("dp",) if c.dp * c.cp > 1 or c.edp > 1 else ()
    # the stage group (traffic kind dp): the grad norm, ZeRO-1 gathers, the step metrics
    stage = ("dp",) if c.world_size // c.pp > 1 else ()
    pp = ("pp",) if c.pp > 1 else ()
    return {"data": (), "forward": model, "backward": model, "forward_backward": model,
            "grad_sync": grads, "optimizer": stage + pp, "metrics": stage + pp}
