"""A peer that never joins the ring surfaces as an error after the process-group timeout."""
import time

import pytest
import torch
import torch.distributed as dist

from engine.context_parallel import ContextParallelAttention
from engine.testing.multiprocess import run_distributed

PG_TIMEOUT_S = 2.0


def _stalled_peer_worker(rank, world):
    core = ContextParallelAttention(dist.group.WORLD, list(range(world)), "ring", 1, "cpu")
    if rank == 1:
        time.sleep(1.5 * PG_TIMEOUT_S)  # does not post its side of the ring exchange in time
        return None
    q = torch.randn(1, 4, 2, 8)
    started = time.monotonic()
    try:
        core(q, q, q)
    except RuntimeError as exc:
        return {"seconds": time.monotonic() - started, "message": str(exc)}
    return {"seconds": time.monotonic() - started, "message": ""}


@pytest.mark.slow
def test_stalled_peer_raises_after_timeout():
    first, _ = run_distributed(_stalled_peer_worker, 2, timeout_s=60, pg_timeout_s=PG_TIMEOUT_S)
    assert "Timed out" in first["message"], first
    assert PG_TIMEOUT_S * 0.9 <= first["seconds"] < 1.5 * PG_TIMEOUT_S, first
