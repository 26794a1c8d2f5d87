"""Collectives of the optimizer (gradient reduction, parameter gather) and their volume.

Byte counts are what one rank sends with ring algorithms, B = bytes of the full buffer:
all-reduce 2(n-1)/n B, reduce-scatter and all-gather (n-1)/n B each (so reduce-scatter +
all-gather costs the same as one all-reduce, the ZeRO-1 trade of arXiv 1910.02054).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

# torch 2.13 renamed the flat-tensor collectives; older releases only have the old names.
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

# Which per-step communication counter an optimizer collective over a mesh axis belongs to.
AXIS_KIND = {"dp": "dp", "cp": "dp", "dp_cp": "dp", "edp": "dp", "tp": "tp", "tp_cp": "tp",
             "stage": "dp", "etp": "tp", "embed": "pp", "pp": "pp"}


def axis_kind(axis: str) -> str:
    return AXIS_KIND.get(axis, axis)


def all_reduce_bytes(tensor: torch.Tensor, group_size: int) -> int:
    return int(2 * (group_size - 1) / group_size * tensor.numel() * tensor.element_size())


def gather_scatter_bytes(full: torch.Tensor, group_size: int) -> int:
    return int((group_size - 1) / group_size * full.numel() * full.element_size())


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
