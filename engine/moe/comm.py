"""Communication primitives of the MoE layer, all autograd-correct and byte-counted.

Variable-size all-gather and reduce-scatter are built on `all_to_all_single`, the one
collective that takes uneven splits on every backend (gloo's all_gather and
reduce_scatter need equal sizes); the traffic per rank equals that of the ring versions.
An all-gather of equal sizes is `all_gather_into_tensor` (no n-fold send copy).
Backward passes are the adjoint collectives:
    all_to_all(split s -> r)  <->  all_to_all(split r -> s)
    all_gather_v              <->  reduce_scatter_v (sum)
A `CommCounter` reports the bytes this rank sends to *other* ranks, forward and backward,
into the mesh's Traffic on the dispatcher's axis.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from engine.parallel.traffic import Link


class CommCounter:
    """Bytes of `rows` rows shaped like x, counted on `link` (None: not counted)."""

    def __init__(self, link: Link | None) -> None:
        self.link = link

    def add(self, rows: int, x: torch.Tensor) -> None:
        if self.link is not None:
            self.link.add(int(rows) * math.prod(x.shape[1:]) * x.element_size())


def group_size(group) -> int:
    return dist.get_world_size(group) if group is not None else 1


def group_rank(group) -> int:
    return dist.get_rank(group) if group is not None else 0


def _a2a(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group,
         counter: CommCounter | None) -> torch.Tensor:
    out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
    if counter is not None:
        counter.add(sum(send_splits) - send_splits[group_rank(group)], x)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group, counter):
        ctx.splits, ctx.group, ctx.counter = (send_splits, recv_splits), group, counter
        return _a2a(x, send_splits, recv_splits, group, counter)

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        return _a2a(grad, recv_splits, send_splits, ctx.group, ctx.counter), None, None, None, None


def all_to_all_v(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group,
                 counter: CommCounter | None = None) -> torch.Tensor:
    """Rows [sum(send_splits), ...] -> [sum(recv_splits), ...], chunk i to/from group rank i."""
    return _AllToAll.apply(x, list(send_splits), list(recv_splits), group, counter)


def _gather_v(x: torch.Tensor, sizes: list[int], group, counter) -> torch.Tensor:
    n = len(sizes)
    if all(size == x.shape[0] for size in sizes):
        # Equal sizes (the all-gather dispatcher, always): the collective itself, with no
        # n-fold send copy; the same bytes and the same values as the all-to-all below.
        out = x.new_empty((n * x.shape[0],) + tuple(x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        if counter is not None:
            counter.add((n - 1) * x.shape[0], x)
        return out
    return _a2a(x.repeat((n,) + (1,) * (x.dim() - 1)), [x.shape[0]] * n, sizes, group, counter)


def _scatter_sum_v(x: torch.Tensor, sizes: list[int], group, counter) -> torch.Tensor:
    n, mine = len(sizes), sizes[group_rank(group)]
    recv = _a2a(x, sizes, [mine] * n, group, counter)
    return recv.view((n, mine) + tuple(x.shape[1:])).sum(0)


class _AllGatherV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group, counter):
        ctx.sizes, ctx.group, ctx.counter = sizes, group, counter
        return _gather_v(x, sizes, group, counter)

    @staticmethod
    def backward(ctx, grad):
        return _scatter_sum_v(grad, ctx.sizes, ctx.group, ctx.counter), None, None, None


class _ReduceScatterV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group, counter):
        ctx.sizes, ctx.group, ctx.counter = sizes, group, counter
        return _scatter_sum_v(x, sizes, group, counter)

    @staticmethod
    def backward(ctx, grad):
        return _gather_v(grad, ctx.sizes, ctx.group, ctx.counter), None, None, None


def all_gather_v(x: torch.Tensor, sizes: list[int], group,
                 counter: CommCounter | None = None) -> torch.Tensor:
    """Concatenate every rank's rows (rank i has sizes[i] rows) in group-rank order."""
    return _AllGatherV.apply(x, list(sizes), group, counter)


def reduce_scatter_v(x: torch.Tensor, sizes: list[int], group,
                     counter: CommCounter | None = None) -> torch.Tensor:
    """Sum x over the group and keep this rank's chunk (rows split by sizes)."""
    return _ReduceScatterV.apply(x, list(sizes), group, counter)


def exchange_counts(send_counts: torch.Tensor, group, counter: CommCounter | None = None) -> torch.Tensor:
    """[n, ...] int64, row i for group rank i -> [n, ...]: row j is what rank j sent me."""
    n = send_counts.shape[0]
    return _a2a(send_counts, [1] * n, [1] * n, group, counter)


def all_gather_counts(counts: torch.Tensor, group, counter: CommCounter | None = None) -> torch.Tensor:
    """[...] int64 -> [n, ...], every rank's counts (equal shapes)."""
    n = group_size(group)
    return _a2a(counts.unsqueeze(0).repeat((n,) + (1,) * counts.dim()), [1] * n, [1] * n,
                group, counter)


def all_reduce_sum_(t: torch.Tensor, group) -> torch.Tensor:
    """In-place SUM over the group (detached statistics); no-op without a group."""
    if group is not None and group_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t
