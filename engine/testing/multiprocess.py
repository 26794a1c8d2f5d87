"""Multi-process harness: run a function on N gloo ranks and collect each rank's result.

A hang fails with a TimeoutError instead of blocking CI; an exception on any rank is
re-raised in the caller with that rank's traceback (engine/parallel/spawn.py).
"""
from __future__ import annotations

from typing import Any, Callable

from engine.parallel.spawn import spawn_ranks


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any,
                    timeout_s: float = 240.0, pg_timeout_s: float = 60.0) -> list[Any]:
    """Runs fn(rank, world_size, *args) on world_size spawned gloo processes.

    fn must be importable (module level). Results must be picklable by torch.save
    (tensors, numbers, lists, dicts). Returns the list of per-rank results.
    """
    return spawn_ranks(fn, world_size, args, timeout_s=timeout_s, pg_timeout_s=pg_timeout_s,
                       what="distributed test")
