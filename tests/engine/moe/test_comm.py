"""Variable-size collectives on 2 gloo ranks with uneven (and zero) sizes: values, the
adjoint backward (<A x, g> = <x, A^T g>), and byte counting."""
import pytest
import torch
import torch.distributed as dist

from engine.moe.comm import CommCounter, all_gather_v, all_to_all_v, exchange_counts, reduce_scatter_v
from engine.parallel.axes import Axis
from engine.parallel.traffic import Link, Traffic
from engine.testing.multiprocess import run_distributed

SIZES = [3, 0]     # rows held by ranks 0, 1


def _rows(rank, n, width=2):
    return torch.arange(n * width, dtype=torch.float32).view(n, width) + 100 * rank


def _comm_worker(rank, world):
    traffic = Traffic()
    group, counter, out = dist.group.WORLD, CommCounter(Link(traffic, Axis.EP)), {}
    x = _rows(rank, SIZES[rank]).requires_grad_(True)
    gathered = all_gather_v(x, SIZES, group, counter)
    out["gathered"] = gathered.detach()
    g = torch.randn(gathered.shape, generator=torch.Generator().manual_seed(7))   # same on all ranks
    (gathered * g).sum().backward()
    out["gather_grad"] = x.grad                          # = sum over ranks of g[my rows]

    y = torch.full((sum(SIZES), 2), float(rank + 1), requires_grad=True)
    scattered = reduce_scatter_v(y, SIZES, group, counter)
    out["scattered"] = scattered.detach()
    scattered.sum().backward()
    out["scatter_grad"] = y.grad

    # all_to_all: rank r sends r + 1 rows to every rank.
    send = [rank + 1] * world
    recv = [src + 1 for src in range(world)]
    z = torch.full((sum(send), 1), float(rank), requires_grad=True)
    received = all_to_all_v(z, send, recv, group, counter)
    out["a2a"] = received.detach().flatten().tolist()
    (received * (rank + 1)).sum().backward()
    out["a2a_grad"] = z.grad.flatten().tolist()
    out["counts"] = exchange_counts(torch.arange(world) + 10 * rank, group).tolist()
    out["bytes"] = traffic.get(Axis.EP)
    return out


@pytest.mark.slow
def test_variable_collectives_values_adjoints_and_bytes():
    results = run_distributed(_comm_worker, 2)
    full = torch.cat([_rows(r, n) for r, n in enumerate(SIZES)])
    g = torch.randn(full.shape, generator=torch.Generator().manual_seed(7))
    starts = [0, 3]
    for rank, out in enumerate(results):
        rows = slice(starts[rank], starts[rank] + SIZES[rank])
        torch.testing.assert_close(out["gathered"], full)
        torch.testing.assert_close(out["gather_grad"], 2 * g[rows])
        torch.testing.assert_close(out["scattered"], torch.full((SIZES[rank], 2), 1.0 + 2.0))
        torch.testing.assert_close(out["scatter_grad"], torch.ones(3, 2))
        assert out["a2a"] == [0.0, 1.0, 1.0]
        assert out["a2a_grad"] == [float(dst + 1) for dst in range(2) for _ in range(rank + 1)]
        assert out["counts"] == [rank + 10 * src for src in range(2)]
    # Rows sent to the other rank x 8 bytes (2 fp32): gather fwd n, its backward (scatter)
    # 3 - n, reduce-scatter fwd 3 - n, its backward (gather) n; a2a rows of 4 bytes:
    # forward r + 1, backward the other rank's s + 1 = 3 - (r + 1).
    for rank, out in enumerate(results):
        n = SIZES[rank]
        rows = n + (3 - n) + (3 - n) + n
        assert out["bytes"] == rows * 8 + ((rank + 1) + 3 - (rank + 1)) * 4
