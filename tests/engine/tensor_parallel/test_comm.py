"""Region functions on 2 gloo ranks: forward values, backward gradients and bytes against
hand expectations (values are integers, so comparisons are exact)."""
import pytest
import torch
import torch.distributed as dist

from engine.tensor_parallel.comm import (TPComm, copy_to_tp_region, gather_from_sequence_parallel,
                                         gather_from_tp_region, reduce_from_tp_region,
                                         reduce_scatter_to_sequence_parallel,
                                         scatter_to_sequence_parallel)
from engine.parallel.axes import Axis
from engine.parallel.traffic import Traffic
from engine.testing.multiprocess import run_distributed

FLOAT = 4  # bytes per fp32 element


def _run(fn, x, grad):
    """Applies one region function with a fresh counter; returns out, input grad, bytes."""
    traffic = Traffic()
    comm = TPComm(dist.group.WORLD, traffic)
    x = x.clone().requires_grad_(True)
    out = fn(x, comm)
    forward_bytes = traffic.get(Axis.TP)
    out.backward(grad)
    return {"out": out.detach(), "grad": x.grad, "fwd": forward_bytes,
            "bwd": traffic.get(Axis.TP) - forward_bytes}


def _regions_worker(rank, world):
    r = float(rank)
    base_bsh = torch.arange(24.0).view(2, 4, 3)       # [b=2, s=4, h=3]
    results = {
        "copy": _run(copy_to_tp_region, torch.full((2, 3), r + 1), torch.full((2, 3), r + 1)),
        "reduce": _run(reduce_from_tp_region, torch.full((2, 3), r + 1), torch.full((2, 3), 10 * (r + 1))),
        "gather_seq": _run(gather_from_sequence_parallel, base_bsh[:, :2] + 100 * r,
                           (r + 1) * base_bsh),
        "reduce_scatter_seq": _run(reduce_scatter_to_sequence_parallel, (r + 1) * base_bsh,
                                   torch.full((2, 2, 3), r + 1)),
        "scatter_seq": _run(scatter_to_sequence_parallel, base_bsh, torch.full((2, 2, 3), r + 1)),
        "gather_tp": _run(gather_from_tp_region, base_bsh[:, :, :2] + 100 * r,
                          (r + 1) * torch.arange(32.0).view(2, 4, 4)),
    }
    try:
        TPComm(dist.group.WORLD, Traffic()).reduce_scatter(torch.zeros(1, 3, 2), 1)
    except ValueError as err:
        results["error"] = str(err)
    return results


@pytest.fixture(scope="module")
def regions():
    return run_distributed(_regions_worker, 2)


@pytest.mark.slow
def test_copy_to_tp_region_is_identity_then_all_reduce(regions):
    for rank, res in enumerate(regions):
        assert torch.equal(res["copy"]["out"], torch.full((2, 3), rank + 1.0))
        assert torch.equal(res["copy"]["grad"], torch.full((2, 3), 3.0))       # 1 + 2
        assert (res["copy"]["fwd"], res["copy"]["bwd"]) == (0, 6 * FLOAT)      # 2(n-1)/n of 6 floats


@pytest.mark.slow
def test_reduce_from_tp_region_is_all_reduce_then_identity(regions):
    for rank, res in enumerate(regions):
        assert torch.equal(res["reduce"]["out"], torch.full((2, 3), 3.0))
        assert torch.equal(res["reduce"]["grad"], torch.full((2, 3), 10.0 * (rank + 1)))
        assert (res["reduce"]["fwd"], res["reduce"]["bwd"]) == (6 * FLOAT, 0)


@pytest.mark.slow
def test_gather_from_sequence_parallel_concatenates_dim1_and_reduce_scatters_grad(regions):
    base = torch.arange(24.0).view(2, 4, 3)
    expected_out = torch.cat([base[:, :2], base[:, :2] + 100], dim=1)   # rank 0 then rank 1
    for rank, res in enumerate(regions):
        assert torch.equal(res["gather_seq"]["out"], expected_out)
        # grads (1 + 2) * base summed, rank r keeps sequence positions [2r, 2r + 2)
        assert torch.equal(res["gather_seq"]["grad"], 3 * base[:, 2 * rank:2 * rank + 2])
        assert (res["gather_seq"]["fwd"], res["gather_seq"]["bwd"]) == (12 * FLOAT, 12 * FLOAT)


@pytest.mark.slow
def test_reduce_scatter_to_sequence_parallel_sums_then_all_gathers_grad(regions):
    base = torch.arange(24.0).view(2, 4, 3)
    expected_grad = torch.cat([torch.full((2, 2, 3), 1.0), torch.full((2, 2, 3), 2.0)], dim=1)
    for rank, res in enumerate(regions):
        assert torch.equal(res["reduce_scatter_seq"]["out"], 3 * base[:, 2 * rank:2 * rank + 2])
        assert torch.equal(res["reduce_scatter_seq"]["grad"], expected_grad)
        assert (res["reduce_scatter_seq"]["fwd"], res["reduce_scatter_seq"]["bwd"]) == (12 * FLOAT, 12 * FLOAT)


@pytest.mark.slow
def test_scatter_to_sequence_parallel_splits_then_all_gathers_grad(regions):
    base = torch.arange(24.0).view(2, 4, 3)
    expected_grad = torch.cat([torch.full((2, 2, 3), 1.0), torch.full((2, 2, 3), 2.0)], dim=1)
    for rank, res in enumerate(regions):
        assert torch.equal(res["scatter_seq"]["out"], base[:, 2 * rank:2 * rank + 2])
        assert torch.equal(res["scatter_seq"]["grad"], expected_grad)
        assert (res["scatter_seq"]["fwd"], res["scatter_seq"]["bwd"]) == (0, 12 * FLOAT)


@pytest.mark.slow
def test_gather_from_tp_region_concatenates_last_dim_and_splits_grad(regions):
    base = torch.arange(24.0).view(2, 4, 3)
    grad_pattern = torch.arange(32.0).view(2, 4, 4)
    for rank, res in enumerate(regions):
        assert torch.equal(res["gather_tp"]["out"], torch.cat([base[..., :2], base[..., :2] + 100], -1))
        # split keeps this rank's own columns of its own upstream grad: no communication
        expected = (rank + 1) * grad_pattern[..., 2 * rank:2 * rank + 2]
        assert torch.equal(res["gather_tp"]["grad"], expected)
        assert (res["gather_tp"]["fwd"], res["gather_tp"]["bwd"]) == (16 * FLOAT, 0)


@pytest.mark.slow
def test_uneven_sequence_is_refused_with_a_clear_error(regions):
    for res in regions:
        assert "not divisible by the TP size 2" in res["error"]
