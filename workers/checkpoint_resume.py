"""A worker group's resume: the newest checkpoint that verifies on every rank.

Each rank checks the checkpoint's structure (engine.checkpoint.fallback.verify_structure,
JSON and file sizes only) and loads it resharded into its own layout, which SHA-256-verifies
every file this rank reads; the ranks' outcomes are all-gathered over the default group, so
every rank loads the same step, and rank 0 alone moves a bad checkpoint aside. Rank 0 turns
each fallback into a "checkpoint_fallback" event and a refusal (no checkpoint verifies, or
one of another model) into a "fatal" event: the driver then ends the job at once with that
one line instead of letting the launcher retry the same load max_failures times.
"""
from __future__ import annotations

from typing import Any, Callable

import torch.distributed as dist

from engine.checkpoint import CheckpointError
from engine.checkpoint.fallback import load_newest_verified, verify_structure
from engine.train.state import load_resharded

Emit = Callable[..., None]     # emit(event_type, **fields): rank 0's event file, else a no-op


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's value, in rank order (gloo and NCCL: torch picks the current device)."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def resume_newest_verified(trainer, root: str, emit: Emit,
                           since_unix: float | None = None) -> int | None:
    """Loads the newest checkpoint under `root` (written at or after since_unix, if given)
    that every rank verifies; returns its step, or None for a fresh start. Raises CheckpointError (after a "fatal" event) otherwise."""
    rank = dist.get_rank()

    def try_load(path: str) -> dict:
        verify_structure(path)
        return load_resharded(trainer, path)

    def warn(message: str) -> None:
        print(message, flush=True)
        emit("checkpoint_fallback", message=message)

    try:
        found = load_newest_verified(root, try_load, rank=rank, gather=all_gather_objects, warn=warn,
                                     since_unix=since_unix)
    except CheckpointError as err:
        emit("fatal", error=f"checkpoint.dir={root}: {err}", cause="checkpoint")
        raise
    return None if found is None else trainer.completed_steps
