"""The tensor + sequence-parallel plan of `MoETransformer` (Megatron TP with SP,
Korthikanti et al. arXiv 2205.05198).

Per block, with residual stream x [b, s/tp, h] (SP region: norms, router, residual adds):
  attn_norm -> all-gather(seq) -> wq | wk | wv (column, by heads) -> core -> wo (row) -> reduce-scatter
  ffn_norm  -> dense SwiGLU / shared expert: all-gather(seq) -> gate | up (column) -> down (row)
            -> reduce-scatter;  the MoE router and routed experts see the [b, s/tp, h] tokens.
One all-gather is shared by the three attention projections (and by gate/up), so the volume
per layer is Megatron's: forward 2 all-gathers + 2 reduce-scatters of b·s·h, backward the
conjugates. Embedding: vocab-parallel, reduce-scattered to SP; head: column-parallel by vocab
on the gathered sequence, logits stay vocab-sharded [b, s, V/tp].

Gradient tags: sliced params are `mark_tp_sharded`; every other non-expert param lives in
the SP region, sees 1/tp of the tokens and is tagged to SUM its gradient over "tp" too.
GQA with num_kv_heads < tp: each rank keeps the kv head its q heads use; the tp/num_kv_heads
ranks holding the same kv head sum their partial wk/wv gradients in backward over a
sub-group of TP (ColumnParallelLinear.weight_grad_comm), so grad sync needs nothing more.
Expert params are left to engine/moe/parallelize.py (ETP is independent of TP).
"""
from __future__ import annotations

import torch
from torch import nn

from engine.layers import Attention, RMSNorm, SwiGLU
from engine.parallel.axes import Axis, SubAxis
from engine.parallel.mesh import FoldedMesh
from engine.parallel.param_attrs import is_expert, is_tp_sharded, set_tp_replicas

from .comm import TPComm, gather_from_sequence_parallel
from .layers import (TOKEN_DIM, ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                     replicated_parameter)


class SequenceGatherRMSNorm(RMSNorm):
    """RMSNorm on this rank's [b, s/tp, h], then one all-gather to [b, s, h] shared by the
    column-parallel projections that read it. Keeps the `weight` parameter object."""

    def __init__(self, norm: RMSNorm, comm: TPComm):
        super().__init__(norm.weight.shape[0], norm.eps)
        self.weight, self.tp_comm = norm.weight, comm

    def forward(self, x_bsh: torch.Tensor) -> torch.Tensor:
        return gather_from_sequence_parallel(super().forward(x_bsh), self.tp_comm, TOKEN_DIM)


class SequenceParallelSwiGLU(SwiGLU):
    """SwiGLU taking SP tokens [b, s/tp, h]: one all-gather feeds gate/up (column-parallel
    over F); down (row-parallel) reduce-scatters back to [b, s/tp, h]."""

    def __init__(self, swiglu: SwiGLU, comm: TPComm):
        nn.Module.__init__(self)   # not SwiGLU.__init__: it would allocate the full weights again
        self.tp_comm = comm
        self.w_gate = ColumnParallelLinear(swiglu.w_gate, comm, input_layout="gathered")
        self.w_up = ColumnParallelLinear(swiglu.w_up, comm, input_layout="gathered")
        self.w_down = RowParallelLinear(swiglu.w_down, comm, output_layout="sequence_sharded")

    def forward(self, x_bsh: torch.Tensor) -> torch.Tensor:
        return super().forward(gather_from_sequence_parallel(x_bsh, self.tp_comm, TOKEN_DIM))


def kv_head_block(tp_rank: int, tp: int, num_kv_heads: int) -> tuple[int, int]:
    """(first kv head, number of kv heads) held by a TP rank whose q heads are the
    contiguous block tp_rank of num_heads/tp (GQA: q head i reads kv head i // (n_q/n_kv))."""
    if num_kv_heads >= tp:
        per_rank = num_kv_heads // tp
        return tp_rank * per_rank, per_rank
    return tp_rank // (tp // num_kv_heads), 1


def kv_replica_groups(mesh: FoldedMesh, num_kv_heads: int) -> list[list[int]]:
    """Global ranks holding the same kv head: consecutive runs of tp/num_kv_heads ranks
    in every TP group (empty when kv heads are not replicated)."""
    tp = mesh.size("tp")
    if num_kv_heads >= tp:
        return []
    return mesh.layout.sub_groups("tp", tp // num_kv_heads)


def build_kv_grad_comm(mesh: FoldedMesh, num_kv_heads: int, tp_comm: TPComm) -> TPComm | None:
    """This rank's kv-replica group (bytes counted on the TP axis); the mesh owns the group."""
    tp = mesh.size(Axis.TP)
    if num_kv_heads >= tp:
        return None
    group, _ = mesh.subgroup(Axis.TP, tp // num_kv_heads)
    return TPComm(group, tp_comm.traffic, SubAxis(Axis.TP, tp // num_kv_heads))


def _check_shapes(model: nn.Module, tp: int) -> None:
    cfg = model.cfg
    if cfg.num_heads % tp:
        raise ValueError(f"parallel.tp={tp}: model.num_heads={cfg.num_heads} is not divisible by it")
    kv = cfg.num_kv_heads
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        raise ValueError(f"parallel.tp={tp}: model.num_kv_heads={kv} must divide it or be a multiple")
    if cfg.vocab_size % tp:
        raise ValueError(f"parallel.tp={tp}: model.vocab_size={cfg.vocab_size} is not divisible by it")


def parallelize_attention(attention: Attention, comm: TPComm, num_kv_heads: int,
                          kv_grad_comm: TPComm | None) -> None:
    """wq column by q heads, wk/wv column by kv heads (or the shared kv head), wo row."""
    attention.wq = ColumnParallelLinear(attention.wq, comm, input_layout="gathered")
    first, count = kv_head_block(comm.rank, comm.size, num_kv_heads)
    kv_range = (first * attention.head_dim, count * attention.head_dim)
    for name in ("wk", "wv"):
        column = ColumnParallelLinear(getattr(attention, name), comm, input_layout="gathered",
                                      out_range=kv_range, weight_grad_comm=kv_grad_comm)
        if kv_grad_comm is not None:
            for param in column.parameters():
                set_tp_replicas(param, kv_grad_comm.size)   # same shard on this many TP ranks
        setattr(attention, name, column)
    attention.wo = RowParallelLinear(attention.wo, comm, output_layout="sequence_sharded")


def _parallelize_block(block: nn.Module, comm: TPComm, num_kv_heads: int,
                       kv_grad_comm: TPComm | None) -> None:
    block.attn_norm = SequenceGatherRMSNorm(block.attn_norm, comm)
    parallelize_attention(block.attention, comm, num_kv_heads, kv_grad_comm)
    if isinstance(block.ffn, SwiGLU):
        block.ffn = SequenceParallelSwiGLU(block.ffn, comm)
    elif getattr(block.ffn, "shared_experts", None) is not None:
        block.ffn.shared_experts = SequenceParallelSwiGLU(block.ffn.shared_experts, comm)


def _parallelize_ends(model: nn.Module, comm: TPComm) -> None:
    if model.embed is not None:
        model.embed = VocabParallelEmbedding(model.embed, comm, output_layout="sequence_sharded")
    if model.head is not None:
        model.head = ColumnParallelLinear(model.head, comm, input_layout="sequence_sharded")
    elif model.norm is not None:
        # Tied head is F.linear(norm(x), embed.weight) on the vocab shard: gather after the norm.
        model.norm = SequenceGatherRMSNorm(model.norm, comm)


def _tag_sequence_parallel_params(model: nn.Module) -> None:
    for param in model.parameters():
        if not is_tp_sharded(param) and not is_expert(param):
            replicated_parameter(param)


def parallelize_tp(model: nn.Module, mesh: FoldedMesh) -> TPComm:
    """Applies the TP+SP plan in place to a (pipeline chunk of a) `MoETransformer` whose
    parameters are still unsharded, and returns the chunk's TP comm (also reachable as
    `module.tp_comm` on every communicating module). No-op on the model at tp = 1.

    Afterwards the chunk takes [b, s] ids (or [b, s/tp, h] hidden) and the full (CP-local)
    positions [b, s], and returns vocab-sharded logits [b, s, V/tp] (or [b, s/tp, h] hidden).
    """
    comm = TPComm(mesh.group(Axis.TP), mesh.traffic)
    if comm.size == 1:
        return comm
    _check_shapes(model, comm.size)
    if any(isinstance(m, (ColumnParallelLinear, VocabParallelEmbedding)) for m in model.modules()):
        raise ValueError("parallelize_tp: the model is already tensor-parallel")
    num_kv_heads = model.cfg.num_kv_heads
    kv_grad_comm = build_kv_grad_comm(mesh, num_kv_heads, comm)
    for block in model.layers.values():
        _parallelize_block(block, comm, num_kv_heads, kv_grad_comm)
    _parallelize_ends(model, comm)
    _tag_sequence_parallel_params(model)
    return comm
