"""A stopping driver (SIGTERM: `ray job stop`, a deleted RayJob, an evicted head pod) first
lets the workers save the step in progress, as a preempted worker does (workers/preemption.py).

torchrun: its whole process group gets the SIGTERM, so every worker sees it directly, and the
launcher waits up to `checkpoint.preempt_grace_s` for torchrun to exit. Ray: the workers may
be on other nodes, so the driver writes the request file in the job dir, which rank 0 reads
(at most every 0.2 s) and votes with in the step's metric reduction; the driver waits for
a newer complete checkpoint marked as that save (a periodic background write that was in
flight at the signal is published first, and is not it), or the end of training, for at
most the grace.
"""
from __future__ import annotations

import os
import time
from typing import Callable

from engine.checkpoint.files import read_json
from engine.checkpoint.manager import latest_checkpoint, rank_file_names
from workers.preemption import STOP_SAVE_KEY, write_request

_POLL_S = 0.1


def save_before_stop(job_dir: str, checkpoint_dir: str, grace_s: float,
                     finished: Callable[[], bool]) -> str | None:
    """Asks the workers to save and stop; returns the new checkpoint, or None when none
    came within grace_s (or training ended first)."""
    seen = latest_checkpoint(checkpoint_dir)
    write_request(job_dir, "the driver is stopping")
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and not finished():
        newest = latest_checkpoint(checkpoint_dir)
        if newest != seen:
            if is_stop_save(newest):
                return newest
            seen = newest     # a periodic save that was in flight at the signal: keep waiting
        time.sleep(_POLL_S)
    return None


def is_stop_save(path: str) -> bool:
    """Whether the checkpoint at `path` is a save the stop (or a preemption) asked for:
    workers/loop.py marks it in rank 0's meta."""
    try:
        return bool(read_json(os.path.join(path, rank_file_names(0)[1]))["meta"].get(STOP_SAVE_KEY))
    except (OSError, ValueError, KeyError, TypeError):
        return False
