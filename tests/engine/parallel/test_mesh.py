"""FoldedMesh builds real gloo groups that match the pure rank arithmetic."""
import pytest
import torch
import torch.distributed as dist

from engine.parallel.config import ParallelConfig
from engine.parallel.mesh import FoldedMesh
from engine.testing.multiprocess import run_distributed


def _mesh_worker(rank, world, kw):
    mesh = FoldedMesh(ParallelConfig(world_size=world, **kw))
    out = {}
    for axis in ("tp", "cp", "dp", "pp", "dp_cp", "ep", "edp", "etp_ep", "embed"):
        value = torch.tensor([float(rank)])
        dist.all_reduce(value, group=mesh.group(axis))
        out[axis] = (mesh.ranks(axis), value.item())
    group, ranks = mesh.subgroup("tp", 1)
    assert mesh.subgroup("tp", 1)[0] is group      # cached: created once
    value = torch.tensor([float(rank)])
    dist.all_reduce(value, group=group)
    out["tp/1"] = (ranks, value.item())
    return out


@pytest.mark.slow
def test_mesh_groups_reduce_over_their_ranks():
    kw = dict(tp=2, cp=1, pp=2, ep=2, etp=1)
    results = run_distributed(_mesh_worker, 8, kw)
    for rank, out in enumerate(results):
        for axis, (ranks, total) in out.items():
            assert rank in ranks
            assert total == float(sum(ranks)), (rank, axis)
