"""Flat-buffer layout of the distributed optimizer: pure logic, no tensors, no collectives.

Params are grouped by everything that decides how their gradient is reduced and counted
in the grad norm: (reduce axes, replica axes, dtype). A group is cut into buckets of about
`bucket_bytes` of fp32 gradient, filled in reverse registration order (roughly the order
in which backward produces gradients). Inside a bucket the weight-decayed params come
first, so AdamW sees at most two contiguous ranges per bucket.

ZeRO-1 (arXiv 1910.02054, stage 1): a bucket is padded to a multiple of
shard_size * ALIGN_ELEMS and the rank at index i of the shard axis owns elements
[i * L, (i + 1) * L), L = padded / shard_size. The shard axis is the first reduce axis
(dp_cp for dense params, edp for experts); the other reduce axes (tp for sequence-parallel
params) are summed afterwards on the shard only, which sends 1/shard_size of the bytes
that summing them on the full buffer first would.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.parallel.axes import TP_COVERING_AXES, Axis, SubAxis
from engine.parallel.mesh import FoldedMesh
from engine.parallel.param_attrs import is_expert, is_tp_sharded, reduce_axes, tp_replicas

ALIGN_ELEMS = 64                      # keeps fp32 shard starts 256-byte aligned
DEFAULT_BUCKET_BYTES = 25 * 2**20     # of fp32 gradient per bucket


def uses_weight_decay(name: str, param: nn.Parameter) -> bool:
    """AdamW decay rule: matrices and expert weight stacks (ndim >= 2) decay; 1-D params
    (norm weights, biases, per-channel scales) and any *.bias or *norm*.weight do not."""
    parts = name.split(".")
    owner = parts[-2] if len(parts) > 1 else ""
    return param.ndim >= 2 and parts[-1] != "bias" and "norm" not in owner


def replica_axes(param: nn.Parameter) -> tuple[Axis | SubAxis, ...]:
    """Axes along which the reduced gradient of `param` is identical: its reduce axes, plus
    tp for a dense param that TP does not slice (it is a full copy on every TP rank)."""
    axes = tuple(reduce_axes(param))
    if tp_replicas(param) > 1:    # the same kv-head shard on k consecutive TP ranks
        return axes + (SubAxis(Axis.TP, tp_replicas(param)),)
    if is_expert(param) or is_tp_sharded(param) or TP_COVERING_AXES.intersection(axes):
        return axes
    return axes + (Axis.TP,)


@dataclass(frozen=True)
class ParamSlot:
    name: str
    index: int          # position in the optimizer's named_params
    offset: int         # first element in the bucket's flat buffers
    numel: int
    decay: bool


@dataclass(frozen=True)
class BucketPlan:
    reduce_axes: tuple[Axis, ...]
    replica_axes: tuple[Axis | SubAxis, ...]
    dtype: torch.dtype
    slots: tuple[ParamSlot, ...]
    padded_numel: int
    shard_axis: str | None      # ZeRO-1 shard axis; None = every rank owns the whole bucket
    shard_start: int
    shard_end: int

    @property
    def used_numel(self) -> int:
        last = self.slots[-1]
        return last.offset + last.numel

    @property
    def decay_end(self) -> int:
        return sum(s.numel for s in self.slots if s.decay)

    def adam_ranges(self) -> list[tuple[int, int, bool]]:
        """(start, end, decay) ranges of bucket elements this rank updates."""
        out = []
        for start, end, decay in ((0, self.decay_end, True), (self.decay_end, self.used_numel, False)):
            lo, hi = max(start, self.shard_start), min(end, self.shard_end)
            if lo < hi:
                out.append((lo, hi, decay))
        return out

    def owned_range(self, slot: ParamSlot) -> tuple[int, int] | None:
        """The range of the flattened param `slot` whose optimizer state lives on this rank."""
        lo = max(slot.offset, self.shard_start)
        hi = min(slot.offset + slot.numel, self.shard_end)
        return (lo - slot.offset, hi - slot.offset) if lo < hi else None

    def reduction_steps(self, mesh: FoldedMesh) -> list[tuple[str, Axis]]:
        """[(collective, axis)] that SUM the gradient; trivial (size-1) axes are skipped."""
        steps = [("all_reduce", axis) for axis in self.reduce_axes]
        if self.shard_axis is not None:
            steps[0] = ("reduce_scatter", self.shard_axis)
        return [(op, axis) for op, axis in steps if mesh.size(axis) > 1]

    def counts_in_norm(self, mesh: FoldedMesh) -> bool:
        """Whether this rank adds the bucket to the global grad norm: exactly one holder of
        each distinct value does (index 0 on every replica axis; a ZeRO shard is distinct)."""
        return all(mesh.rank_in(axis) == 0 for axis in self.replica_axes if axis != self.shard_axis)


def _bucket_key(param: nn.Parameter) -> tuple:
    return (tuple(reduce_axes(param)), replica_axes(param), param.dtype)


def _group_into_buckets(named_params, bucket_bytes: int) -> list[list[int]]:
    """Indices of trainable params per bucket, in launch order (reverse registration order)."""
    open_members: dict[tuple, list[int]] = {}
    open_bytes: dict[tuple, int] = {}
    closed: list[list[int]] = []
    for index in reversed(range(len(named_params))):
        param = named_params[index][1]
        if not param.requires_grad:
            continue
        key, grad_bytes = _bucket_key(param), param.numel() * 4
        if key in open_members and open_bytes[key] + grad_bytes > bucket_bytes:
            closed.append(open_members.pop(key))
        if key not in open_members:
            open_members[key], open_bytes[key] = [], 0
        open_members[key].append(index)
        open_bytes[key] += grad_bytes
    closed.extend(open_members.values())
    return sorted(closed, key=lambda members: -members[0])   # first gradient to arrive first


def _plan(named_params, members: list[int], mesh: FoldedMesh, zero1: bool) -> BucketPlan:
    first = named_params[members[0]][1]
    axes = tuple(reduce_axes(first))
    decay = {i: uses_weight_decay(*named_params[i]) for i in members}
    slots, offset = [], 0
    for i in sorted(members, key=lambda i: not decay[i]):      # stable: decayed params first
        numel = named_params[i][1].numel()
        slots.append(ParamSlot(named_params[i][0], i, offset, numel, decay[i]))
        offset += numel
    shard_axis = axes[0] if zero1 and axes else None
    shards = mesh.size(shard_axis) if shard_axis else 1
    multiple = shards * ALIGN_ELEMS if shard_axis else 1
    padded = -(-offset // multiple) * multiple
    shard_len = padded // shards
    start = mesh.rank_in(shard_axis) * shard_len if shard_axis else 0
    return BucketPlan(axes, replica_axes(first), first.dtype, tuple(slots), padded, shard_axis,
                      start, start + shard_len)


def plan_buckets(named_params: list[tuple[str, nn.Parameter]], mesh: FoldedMesh, *, zero1: bool,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[BucketPlan]:
    """Bucket layout of the params that require grad, in launch order."""
    return [_plan(named_params, members, mesh, zero1)
            for members in _group_into_buckets(named_params, bucket_bytes)]
