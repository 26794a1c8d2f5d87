"""How each parameter is laid out across the folded mesh.

Parallelize functions tag parameters; gradient sync, clipping and checkpoints read the
tags. A parameter with no tag is a dense replicated parameter.

- reduce axes: mesh axes over which the gradient is SUM-reduced. Losses are normalised
  by the global token count, so summing is exact for every layout (no 1/dp scaling
  that would differ between dp and edp, cf. Megatron PR #1622).
  Dense: ("dp_cp",); dense under sequence parallelism: ("dp_cp", "tp"); experts: ("edp",).
- expert: sharded over etp x ep, replicated over edp.
- tp_sharded: a slice along TP (column/row/vocab parallel); replicated params are not.
"""
from __future__ import annotations

import torch
from torch import nn

from .axes import Axis

DENSE_AXES = (Axis.DP_CP,)
EXPERT_AXES = (Axis.EDP,)


def set_reduce_axes(param: nn.Parameter, axes: tuple[Axis, ...]) -> None:
    param.foldmoe_reduce_axes = tuple(Axis(a) for a in axes)


def reduce_axes(param: nn.Parameter) -> tuple[Axis, ...]:
    return getattr(param, "foldmoe_reduce_axes", DENSE_AXES)


def mark_expert(param: nn.Parameter) -> None:
    param.foldmoe_expert = True
    set_reduce_axes(param, EXPERT_AXES)


def is_expert(param: nn.Parameter) -> bool:
    return getattr(param, "foldmoe_expert", False)


def mark_tp_sharded(param: nn.Parameter, dim: int) -> None:
    param.foldmoe_tp_sharded = True
    param.foldmoe_tp_dim = dim


def is_tp_sharded(param: nn.Parameter) -> bool:
    return getattr(param, "foldmoe_tp_sharded", False)


def tp_dim(param: nn.Parameter) -> int | None:
    """The dim TP slices a tp_sharded param along; None for the others."""
    return getattr(param, "foldmoe_tp_dim", None)


def set_tp_replicas(param: nn.Parameter, count: int) -> None:
    param.foldmoe_tp_replicas = int(count)


def tp_replicas(param: nn.Parameter) -> int:
    """How many consecutive TP ranks hold the same TP shard (kv heads replicated when
    num_kv_heads < tp); 1 for everything else."""
    return getattr(param, "foldmoe_tp_replicas", 1)


def copy_attrs(src: nn.Parameter, dst: nn.Parameter) -> None:
    for key, value in vars(src).items():
        if key.startswith("foldmoe_"):
            setattr(dst, key, value)


def add_slice(param: nn.Parameter, dim: int, start: int, length: int) -> None:
    """Records that the local tensor is global[..., start:start+length, ...] along `dim`
    (applied in order; parity tests and checkpoint metadata read it)."""
    param.foldmoe_slices = tuple(getattr(param, "foldmoe_slices", ())) + ((dim, start, length),)


def add_index_slice(param: nn.Parameter, dim: int, indices: list[int]) -> None:
    """Like add_slice for a non-contiguous selection (e.g. replicated kv heads)."""
    param.foldmoe_slices = tuple(getattr(param, "foldmoe_slices", ())) + ((dim, tuple(indices), None),)


def apply_slices(full, slices):
    """The part of the unsharded tensor `full` described by a list of recorded slices."""
    out = full
    for dim, start, length in slices:
        if length is None:
            out = out.index_select(dim, torch.tensor(start, dtype=torch.long))
        else:
            out = out.narrow(dim, start, length)
    return out


def slices(param: nn.Parameter) -> tuple:
    """The recorded (dim, start, length) slices of `param`, in the order they were applied."""
    return tuple(getattr(param, "foldmoe_slices", ()))


def global_slice(param: nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    """The part of the unsharded tensor `full` that this rank's `param` holds."""
    return apply_slices(full, slices(param))
