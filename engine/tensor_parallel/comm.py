"""Communication of tensor + sequence parallelism (Megatron-LM: Shoeybi et al. arXiv 1909.08053;
sequence parallelism: Korthikanti et al. arXiv 2205.05198, sec. 4.2.2).

`TPComm` owns the group and counts bytes; the region functions below are autograd-correct
"forward X / backward Y" pairs. They are custom autograd functions rather than
`torch.distributed.nn.functional` because TP needs the conjugate pairs of Megatron
(e.g. all-reduce forward with *identity* backward: every TP rank computes the same
downstream loss, so its output gradient is already complete), which torch does not offer.

Tensors are batch-first [b, s, h]; the sequence dim is dim 1 (dim -2, the token dim just
before the features, so flattened [tokens, h] works too). Gathers and reduce-scatters move
the chosen dim to the front and use torch's single-tensor collectives on the contiguous
buffer, so rank r owns chunk r of that dim.

Byte accounting: every collective reports the bytes this rank puts on the wire into the
mesh's Traffic on the comm's axis (ring volumes, engine/parallel/traffic.py); split sends
nothing.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from engine.parallel.axes import Axis, SubAxis
from engine.parallel.traffic import Traffic, ring_all_reduce_bytes, ring_gather_bytes

SEQ_DIM = 1


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class TPComm:
    """A TP (or TP-subgroup) process group and the Traffic its bytes are counted into.

    A sub-group of TP (the ranks sharing a replicated kv head) has a SubAxis of TP, so its
    bytes count on the TP axis.
    """

    def __init__(self, group, traffic: Traffic, axis: Axis | SubAxis = Axis.TP):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.traffic, self.axis = traffic, axis

    def _count(self, num_bytes: int) -> None:
        self.traffic.add(self.axis, num_bytes)

    def __repr__(self) -> str:
        return f"TPComm(rank={self.rank}, size={self.size}, axis={self.axis})"

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """In place on a contiguous tensor; returns it."""
        if self.size > 1:
            dist.all_reduce(tensor, op=op, group=self.group)
            self._count(ring_all_reduce_bytes(nbytes(tensor), self.size))
        return tensor

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenation of every rank's x along dim (rank order)."""
        if self.size == 1:
            return x
        front = x.movedim(dim, 0).contiguous()
        out = front.new_empty((self.size * front.shape[0],) + tuple(front.shape[1:]))
        dist.all_gather_single(out, front, group=self.group)
        self._count(ring_gather_bytes(nbytes(out), self.size))
        return out.movedim(0, dim).contiguous()

    def reduce_scatter(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Chunk `rank` along dim of the SUM of every rank's x."""
        if self.size == 1:
            return x
        front = x.movedim(dim, 0).contiguous()
        self._check_divisible(front.shape[0], dim)
        out = front.new_empty((front.shape[0] // self.size,) + tuple(front.shape[1:]))
        dist.reduce_scatter_single(out, front, group=self.group)
        self._count(ring_gather_bytes(nbytes(front), self.size))
        return out.movedim(0, dim).contiguous()

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's chunk along dim (no communication)."""
        if self.size == 1:
            return x
        self._check_divisible(x.shape[dim], dim)
        return x.chunk(self.size, dim)[self.rank].contiguous()

    def _check_divisible(self, length: int, dim: int) -> None:
        if length % self.size:
            raise ValueError(f"tensor dim {dim} of size {length} is not divisible by the TP size "
                             f"{self.size} (sequence parallelism needs seq_len % tp == 0)")


def _owned(x: torch.Tensor) -> torch.Tensor:
    # In-place collectives must not write into a tensor autograd may hold elsewhere.
    return x.clone(memory_format=torch.contiguous_format)


class _CopyToTPRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.all_reduce(_owned(grad)), None


class _ReduceFromTPRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        return comm.all_reduce(_owned(x))

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromSequenceParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, dim):
        ctx.comm, ctx.dim = comm, dim
        return comm.all_gather(x, dim)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.reduce_scatter(grad, ctx.dim), None, None


class _ReduceScatterToSequenceParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, dim):
        ctx.comm, ctx.dim = comm, dim
        return comm.reduce_scatter(x, dim)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.all_gather(grad, ctx.dim), None, None


class _ScatterToSequenceParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, dim):
        ctx.comm, ctx.dim = comm, dim
        return comm.split(x, dim)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.all_gather(grad, ctx.dim), None, None


class _GatherFromTPRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return comm.all_gather(x, -1)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.split(grad, -1), None


def copy_to_tp_region(x: torch.Tensor, comm: TPComm) -> torch.Tensor:
    """Forward identity / backward all-reduce (entry of a column-parallel linear without SP,
    and of a parameter replicated on ranks that each compute a partial gradient)."""
    return _CopyToTPRegion.apply(x, comm)


def reduce_from_tp_region(x: torch.Tensor, comm: TPComm) -> torch.Tensor:
    """Forward all-reduce / backward identity (exit of a row-parallel linear without SP)."""
    return _ReduceFromTPRegion.apply(x, comm)


def gather_from_sequence_parallel(x: torch.Tensor, comm: TPComm, dim: int = SEQ_DIM) -> torch.Tensor:
    """Forward all-gather along the sequence / backward reduce-scatter:
    [b, s/tp, h] -> [b, s, h] (entry of the TP region under SP)."""
    return _GatherFromSequenceParallel.apply(x, comm, dim)


def reduce_scatter_to_sequence_parallel(x: torch.Tensor, comm: TPComm,
                                        dim: int = SEQ_DIM) -> torch.Tensor:
    """Forward reduce-scatter along the sequence / backward all-gather:
    partial [b, s, h] -> summed [b, s/tp, h] (exit of the TP region under SP)."""
    return _ReduceScatterToSequenceParallel.apply(x, comm, dim)


def scatter_to_sequence_parallel(x: torch.Tensor, comm: TPComm, dim: int = SEQ_DIM) -> torch.Tensor:
    """Forward split along the sequence / backward all-gather: replicated [b, s, h] ->
    this rank's [b, s/tp, h]."""
    return _ScatterToSequenceParallel.apply(x, comm, dim)


def gather_from_tp_region(x: torch.Tensor, comm: TPComm) -> torch.Tensor:
    """Forward all-gather along the last dim / backward split: [..., n/tp] -> [..., n]."""
    return _GatherFromTPRegion.apply(x, comm)
