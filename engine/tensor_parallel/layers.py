"""Megatron-style tensor-parallel layers built *from* unsharded modules by slicing.

Each layer keeps the parameter names of the module it replaces (`weight`, `bias`), and a
shard is exactly the slice of the single-process parameter (recorded with `add_slice` for
parity tests and checkpoints). Column-parallel splits the output features, row-parallel
the input features (Shoeybi et al. arXiv 1909.08053, sec. 3); under sequence parallelism
(Korthikanti et al. arXiv 2205.05198) the TP region is entered with an all-gather along the
sequence and left with a reduce-scatter instead of the identity/all-reduce pair.

Input/output layouts:
- "sequence_sharded": [b, s/tp, h] tokens of this TP rank (SP region);
- "replicated": the full [b, s, h] on every TP rank (TP without SP);
- "gathered" (column input only): the caller already entered the TP region (e.g. one
  all-gather shared by wq/wk/wv), so the layer does no communication.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.parallel.axes import TP_COVERING_AXES, Axis
from engine.parallel.param_attrs import add_slice, copy_attrs, mark_tp_sharded, reduce_axes, set_reduce_axes

from .comm import (TPComm, copy_to_tp_region, gather_from_sequence_parallel, reduce_from_tp_region,
                   reduce_scatter_to_sequence_parallel)

TOKEN_DIM = -2   # dim 1 of [b, s, h]; dim 0 of flattened [tokens, h]
_COLUMN_INPUTS = ("sequence_sharded", "replicated", "gathered")
_ROW_OUTPUTS = ("sequence_sharded", "replicated")


def even_range(size: int, comm: TPComm, what: str) -> tuple[int, int]:
    """(start, length) of this TP rank's contiguous 1/tp block of `size`."""
    if size % comm.size:
        raise ValueError(f"{what}={size} is not divisible by the TP size {comm.size}")
    length = size // comm.size
    return comm.rank * length, length


def sliced_parameter(param: nn.Parameter, dim: int, start: int, length: int) -> nn.Parameter:
    """A new parameter holding param[start:start+length] along dim, with its tags."""
    shard = nn.Parameter(param.detach().narrow(dim, start, length).clone(),
                         requires_grad=param.requires_grad)
    copy_attrs(param, shard)
    add_slice(shard, dim, start, length)
    mark_tp_sharded(shard, dim)
    return shard


def replicated_parameter(param: nn.Parameter) -> nn.Parameter:
    """The same parameter, tagged as a sum of per-TP-rank partial gradients (SP region)."""
    axes = reduce_axes(param)
    if not TP_COVERING_AXES.intersection(axes):   # else already summed over the TP ranks
        set_reduce_axes(param, tuple(axes) + (Axis.TP,))
    return param


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise ValueError(f"{what}={value!r}: expected one of {choices}")


class ColumnParallelLinear(nn.Module):
    """y[..., out/tp] = x W_r^T + b_r with W_r = rows [start, start+length) of W [out, in].

    `out_range` overrides the even block (GQA with fewer kv heads than TP ranks keeps the
    kv head its q heads use). `weight_grad_comm`, when given, is the group of ranks that
    hold the same rows: each computes a partial weight gradient, summed in backward by an
    identity-forward / all-reduce-backward on the weight.
    """

    def __init__(self, linear: nn.Linear, comm: TPComm, *, input_layout: str = "sequence_sharded",
                 out_range: tuple[int, int] | None = None, weight_grad_comm: TPComm | None = None):
        super().__init__()
        _check_choice(input_layout, _COLUMN_INPUTS, "input_layout")
        self.tp_comm, self.input_layout, self.weight_grad_comm = comm, input_layout, weight_grad_comm
        start, length = out_range or even_range(linear.out_features, comm, "out_features")
        self.in_features, self.out_features = linear.in_features, length
        self.weight = sliced_parameter(linear.weight, 0, start, length)        # [out/tp, in]
        self.bias = sliced_parameter(linear.bias, 0, start, length) if linear.bias is not None else None

    def _enter_region(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_layout == "sequence_sharded":
            return gather_from_sequence_parallel(x, self.tp_comm, TOKEN_DIM)
        if self.input_layout == "replicated":
            return copy_to_tp_region(x, self.tp_comm)
        return x

    def _shared_params(self):
        if self.weight_grad_comm is None:
            return self.weight, self.bias
        bias = None if self.bias is None else copy_to_tp_region(self.bias, self.weight_grad_comm)
        return copy_to_tp_region(self.weight, self.weight_grad_comm), bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._shared_params()
        return F.linear(self._enter_region(x), weight, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features_local={self.out_features}, "
                f"input_layout={self.input_layout}, tp={self.tp_comm.size}")


class RowParallelLinear(nn.Module):
    """y = sum_r x_r W_r^T + b with W_r = columns of W [out, in] for this rank's input block.

    The partial products are reduce-scattered along the sequence (SP) or all-reduced;
    the bias is added once after the reduction, so it is replicated (and under SP its
    gradient is a per-rank partial sum, tagged for a SUM over "tp").
    """

    def __init__(self, linear: nn.Linear, comm: TPComm, *, output_layout: str = "sequence_sharded"):
        super().__init__()
        _check_choice(output_layout, _ROW_OUTPUTS, "output_layout")
        self.tp_comm, self.output_layout = comm, output_layout
        start, length = even_range(linear.in_features, comm, "in_features")
        self.in_features, self.out_features = length, linear.out_features
        self.weight = sliced_parameter(linear.weight, 1, start, length)        # [out, in/tp]
        self.bias = None
        if linear.bias is not None:
            # Without SP every TP rank computes the same bias gradient: no TP reduction then.
            self.bias = replicated_parameter(linear.bias) if output_layout == "sequence_sharded" \
                else linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = F.linear(x, self.weight)
        if self.output_layout == "sequence_sharded":
            out = reduce_scatter_to_sequence_parallel(partial, self.tp_comm, TOKEN_DIM)
        else:
            out = reduce_from_tp_region(partial, self.tp_comm)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (f"in_features_local={self.in_features}, out_features={self.out_features}, "
                f"output_layout={self.output_layout}, tp={self.tp_comm.size}")


class VocabParallelEmbedding(nn.Module):
    """Vocab-sharded table [V/tp, h]: each rank looks up the ids in its vocab range (others
    give zero rows) and the partial [b, s, h] is reduce-scattered to [b, s/tp, h] (SP) or
    all-reduced (Megatron's VocabParallelEmbedding, SP variant)."""

    def __init__(self, embedding: nn.Embedding, comm: TPComm, *, output_layout: str = "sequence_sharded"):
        super().__init__()
        _check_choice(output_layout, _ROW_OUTPUTS, "output_layout")
        if embedding.padding_idx is not None or embedding.max_norm is not None:
            raise ValueError("VocabParallelEmbedding: padding_idx/max_norm are not supported")
        self.tp_comm, self.output_layout = comm, output_layout
        self.vocab_start, self.num_local = even_range(embedding.num_embeddings, comm, "vocab_size")
        self.embedding_dim = embedding.embedding_dim
        self.weight = sliced_parameter(embedding.weight, 0, self.vocab_start, self.num_local)

    def forward(self, ids_bs: torch.Tensor) -> torch.Tensor:
        local_ids = ids_bs - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.num_local)
        rows_bsh = F.embedding(local_ids.masked_fill(outside, 0), self.weight)
        partial_bsh = rows_bsh.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.output_layout == "sequence_sharded":
            return reduce_scatter_to_sequence_parallel(partial_bsh, self.tp_comm, TOKEN_DIM)
        return reduce_from_tp_region(partial_bsh, self.tp_comm)

    def extra_repr(self) -> str:
        return (f"vocab [{self.vocab_start}, {self.vocab_start + self.num_local}), "
                f"dim={self.embedding_dim}, output_layout={self.output_layout}")
