"""engine/parallel/spawn.py: per-rank results, a failing rank's traceback, a hang's timeout."""
from __future__ import annotations

import multiprocessing
import time

import pytest
import torch
import torch.distributed as dist

from engine.parallel.spawn import spawn_ranks

pytestmark = pytest.mark.slow


def _sum_of_ranks(rank: int, world: int, offset: int) -> tuple:
    value = torch.tensor([float(rank)])
    dist.all_reduce(value)
    return rank, int(value.item()) + offset, torch.get_num_threads()


def _rank1_fails(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("rank one's own error")


def _hangs(rank: int, world: int) -> None:
    time.sleep(120)


def test_every_rank_returns_its_result_in_rank_order():
    results = spawn_ranks(_sum_of_ranks, 2, (10,), timeout_s=120, pg_timeout_s=60, what="test")
    assert results == [(0, 11, 1), (1, 11, 1)]


def test_a_failing_rank_raises_with_its_traceback():
    with pytest.raises(RuntimeError, match="(?s)rank.*failed.*rank one's own error"):
        spawn_ranks(_rank1_fails, 2, timeout_s=120, pg_timeout_s=60, what="test")


def test_a_hang_times_out_and_leaves_no_child():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="test did not finish within 3s"):
        spawn_ranks(_hangs, 2, timeout_s=3, pg_timeout_s=60, what="test")
    assert time.monotonic() - start < 60
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.1)                          # killed: reaped within moments
    assert not multiprocessing.active_children()
