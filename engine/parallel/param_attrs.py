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

from torch import nn

DENSE_AXES = ("dp_cp",)
EXPERT_AXES = ("edp",)


def set_reduce_axes(param: nn.Parameter, axes: tuple[str, ...]) -> None:
    param.foldmoe_reduce_axes = tuple(axes)


def reduce_axes(param: nn.Parameter) -> tuple[str, ...]:
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


def copy_attrs(src: nn.Parameter, dst: nn.Parameter) -> None:
    for key, value in vars(src).items():
        if key.startswith("foldmoe_"):
            setattr(dst, key, value)
