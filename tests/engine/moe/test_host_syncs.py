"""Host reads of the MoE layer (engine.testing.host_syncs counts every Tensor -> Python
value read). Bounds of issue 11: at most one read per forward in the dropless all-to-all
path (the split sizes of every exchange, EP and ETP, in one copy), none in the all-gather
and pad-to-capacity paths, none in any backward; the routing statistics and aux losses
stay on the device. Measured on 2 gloo ranks with sizes the grouped GEMM takes (the
unbind fallback reads the counts once more)."""
import pytest
import torch

from engine.config.model import MoEConfig
from engine.moe.layer import MoELayer
from engine.moe.parallelize import parallelize_moe
from engine.moe.tracking import moe_stats_tensors
from engine.parallel.config import ParallelConfig
from engine.parallel.mesh import FoldedMesh
from engine.testing.host_syncs import HostReadCounter
from engine.testing.multiprocess import run_distributed

HIDDEN = 16
ROUTER = dict(num_experts=4, top_k=2, ffn_hidden_size=8, aux_loss_type="switch", aux_loss_coeff=1e-2,
              z_loss_coeff=1e-3)
MOE = {"dropless": MoEConfig(**ROUTER),
       "drop": MoEConfig(**ROUTER, capacity_factor=1.0),
       "pad": MoEConfig(**ROUTER, capacity_factor=1.0, pad_to_capacity=True),
       "seq_aux_no_coeff": MoEConfig(**dict(ROUTER, aux_loss_type="seq", aux_loss_coeff=0.0,
                                            z_loss_coeff=0.0))}
# (layout, dispatcher, moe config) -> max reads per forward
BOUNDS = {("ep2", "alltoall", "dropless"): 1, ("ep2", "alltoall", "drop"): 1,
          ("ep2", "alltoall", "pad"): 0, ("etp2", "alltoall", "dropless"): 1,
          ("ep2", "alltoall", "seq_aux_no_coeff"): 1,
          ("ep2", "allgather", "dropless"): 0, ("ep2", "allgather", "drop"): 0,
          ("ep2", "allgather", "pad"): 0, ("etp2", "allgather", "dropless"): 0}
LAYOUTS = {"ep2": dict(ep=2), "etp2": dict(etp=2)}


def _count(layer, x):
    with HostReadCounter() as forward:
        y = layer(x)
    with HostReadCounter() as backward:
        y.square().sum().backward()
    return forward, backward


def _worker(rank, world, cases):
    meshes = {name: FoldedMesh(ParallelConfig(world_size=world, **layout)) for name, layout in LAYOUTS.items()}
    out = {}
    for layout, dispatcher, moe in cases:
        torch.manual_seed(0)
        layer = MoELayer(HIDDEN, MOE[moe])
        parallelize_moe(layer, meshes[layout], dispatcher=dispatcher)
        x = torch.randn(2, 8, HIDDEN, requires_grad=True)
        _count(layer, x)                                  # warm-up (lazy inits)
        forward, backward = _count(layer, x)
        with HostReadCounter() as stats:
            values = moe_stats_tensors(layer)             # the per-step reduction: device only
        out[(layout, dispatcher, moe)] = dict(forward=forward.count, backward=backward.count,
                                              stats=stats.count, sites=forward.sites + backward.sites,
                                              aux=float(values["aux_loss"]))
    return out


@pytest.mark.slow
def test_host_reads_per_moe_layer_forward_hold_the_bounds():
    results = run_distributed(_worker, 2, list(BOUNDS), timeout_s=240)
    for rank, per_case in enumerate(results):
        for case, bound in BOUNDS.items():
            got = per_case[case]
            assert got["forward"] <= bound, (rank, case, got["sites"])
            assert got["backward"] == 0 and got["stats"] == 0, (rank, case, got["sites"])
            assert got["aux"] > 0, (rank, case)           # the statistics were really computed
        # The counter sees real reads: the dropless all-to-all must read its split sizes.
        assert per_case[("ep2", "alltoall", "dropless")]["forward"] == 1


def test_counter_counts_every_kind_of_read_and_restores_tensor():
    t = torch.tensor([1.5])
    with HostReadCounter() as reads:
        t.item(), t.tolist(), t.cpu(), bool(t > 0), int(t), float(t), [0, 1][t.long()[0]]
    assert reads.count >= 7 and "item at" in reads.sites[0]
    assert "item" not in torch.Tensor.__dict__        # the class is left as it was
