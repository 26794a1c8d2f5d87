"""Two gloo ranks saving into one shared root: each rank writes and reads only its own file."""
import os

import pytest
import torch
import torch.distributed as dist

from engine.checkpoint import CheckpointError, CheckpointManager
from engine.testing.multiprocess import run_distributed

LAYOUT = {"world_size": 2, "dp": 2}


def _rank_state(rank, step):
    # rank-specific names and values, as with sharded experts
    return {"tensors": {f"expert{rank}.w": torch.full((2, 3), float(10 * step + rank)),
                        "shared.w": torch.arange(4.0) + rank},
            "shards": {f"expert{rank}.w": {"global_shape": [4, 3], "dim": 0, "offset": 2 * rank,
                                           "axes": ["ep"]}},
            "meta": {"step": step, "layout": LAYOUT}}


def _save_then_load(rank, world_size, root):
    manager = CheckpointManager(root, keep=2, rank=rank, world_size=world_size,
                                barrier=dist.barrier)
    for step in (1, 2, 3):
        path = manager.save(step, _rank_state(rank, step))
        assert manager.latest() == path  # complete on every rank when save returns
    dist.barrier()
    loaded = manager.load(manager.latest(), rank, layout=LAYOUT)
    return {"tensors": loaded["tensors"], "shards": loaded["shards"], "meta": loaded["meta"],
            "checkpoints": [step for step, _ in manager.checkpoints()]}


@pytest.mark.slow
def test_two_ranks_round_trip_keep_and_refusal(tmp_path):
    root = str(tmp_path / "ckpt")
    results = run_distributed(_save_then_load, 2, root, timeout_s=120)
    for rank, result in enumerate(results):
        expected = _rank_state(rank, 3)
        assert result["checkpoints"] == [2, 3]
        assert set(result["tensors"]) == set(expected["tensors"])
        for name, tensor in expected["tensors"].items():
            assert torch.equal(result["tensors"][name], tensor), (rank, name)
        assert result["shards"] == expected["shards"] and result["meta"] == expected["meta"]
    files = sorted(os.listdir(os.path.join(root, "step00000003")))
    assert [f for f in files if f.endswith(".safetensors")] == [
        "rank00000.safetensors", "rank00001.safetensors"]
    single = CheckpointManager(root, keep=2, rank=0, world_size=1, barrier=lambda: None)
    with pytest.raises(CheckpointError, match="world size 2, this run has 1"):
        single.load(single.latest(), 0)
