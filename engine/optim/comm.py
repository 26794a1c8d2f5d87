"""Collectives of the optimizer: gradient reduction and the ZeRO-1 parameter gather.
Their volume is counted by the caller into the mesh's Traffic (engine/parallel/traffic.py)."""
from __future__ import annotations

import torch
import torch.distributed as dist

# torch 2.13 renamed the flat-tensor collectives; older releases only have the old names.
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_reduce_sum(tensor: torch.Tensor, group, async_op: bool = False):
    return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group, async_op=async_op)


def reduce_scatter_sum(shard_out: torch.Tensor, full_in: torch.Tensor, group, async_op: bool = False):
    """SUM over the group of `full_in`, this rank keeping its 1/n block in `shard_out`
    (which may be that block of `full_in` itself: in-place, as NCCL and gloo allow)."""
    return _reduce_scatter_flat(shard_out, full_in, op=dist.ReduceOp.SUM, group=group,
                                async_op=async_op)


def all_gather_into(full_out: torch.Tensor, shard_in: torch.Tensor, group, async_op: bool = False):
    """Concatenates every rank's `shard_in` into `full_out` (in-place when `shard_in` is
    this rank's block of `full_out`)."""
    return _all_gather_flat(full_out, shard_in, group=group, async_op=async_op)
