"""Activation bytes one rank keeps for backward, per layer and per micro-batch, as the
engine's code saves them (counted tensor by tensor; checked against the real Trainer in
tests/engine/planner/test_memory_measured.py).

Notation: one micro-batch of b sequences; t = b·s/cp tokens of this rank's sequence shard
(the TP-gathered region), t_sp = t/tp (the sequence-parallel region: norms, router,
residual); e = 2 (bf16) or 4 (fp32) bytes per activation element; q/kv heads per TP rank.
- RMSNorm (fp32 statistics, engine/models/layers.py): the fp32 input, x·rsqrt, rsqrt.
- attention: the (gathered) norm output read by wq/wk/wv, RoPE cos/sin (fp32), the core's
  (q, k, v, out) and its fp32 log-sum-exp (engine/attention/core.py; CP cores the same).
- SwiGLU: its input, gate and up outputs, their product (3 x [t, F/tp]; engine/swiglu.py
  recomputes silu(gate) in backward).
- MoE: the router's fp32 input and softmax / top-k / z-loss tensors; the assignment
  indices; the expert inputs and their gate and up outputs (2 x [rows, F/etp]: the grouped
  experts recompute the product in backward, engine/moe/experts.py); the combine's expert
  outputs in the model dtype and fp32 weights (engine/moe/dispatcher_local.py).
Recompute: `selective` re-runs only the core attention (keeps q, k, v, out, not lse);
`full` keeps the block input (and positions) per layer; `remat_aware` (LightSeq) keeps
the block input and the core's (q, k, v, out, lse); both re-materialise one layer at a time
in backward, which the caller adds once as working memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from engine.config.model import ModelConfig

from .shards import local_kv_heads

INDEX_BYTES = 8     # int64 indices
FP32 = 4


@dataclass(frozen=True)
class MicroBatchShape:
    """One micro-batch on one rank."""
    batch: int            # sequences (train.micro_batch_size)
    seq_local: int        # s / cp
    tp: int
    act_bytes: int        # 2 bf16, 4 fp32
    cp_a2a: int = 1       # ranks of the CP all-to-all (parallel.cp_mode a2a / hybrid), else 1

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_local

    @property
    def sp_tokens(self) -> int:
        return self.tokens // self.tp


@dataclass(frozen=True)
class DispatchRows:
    """Token rows a MoE layer handles on one rank: `assigned` = this rank's (token, expert)
    pairs; `at_experts` = rows its local experts process (after the EP all-to-all and the
    ETP all-gather); `gathered` = tokens the all-gather dispatcher collects (0 for all-to-all)."""
    assigned: int
    at_experts: int
    gathered: int = 0


def norm_bytes(mb: MicroBatchShape, hidden: int) -> int:
    return FP32 * (2 * mb.sp_tokens * hidden + mb.sp_tokens)


def attention_bytes(cfg: ModelConfig, mb: MicroBatchShape, recompute: str) -> int:
    """Everything an attention sub-block keeps (norm included)."""
    t, e, d = mb.tokens, mb.act_bytes, cfg.dim_head
    q_heads, kv_heads = cfg.num_heads // mb.tp, local_kv_heads(cfg.num_kv_heads, mb.tp)
    qkv_out = e * t * d * (2 * q_heads + 2 * kv_heads)              # q, k, v, out
    lse = FP32 * mb.batch * q_heads * mb.seq_local
    if recompute == "selective":
        lse = 0                                                     # re-run by the core's checkpoint
    rope = FP32 * t * d                                             # cos, sin [t, d/2]
    a2a = _a2a_extra(mb, q_heads, kv_heads, d) if recompute != "selective" else 0
    return norm_bytes(mb, cfg.hidden_size) + e * t * cfg.hidden_size + rope + qkv_out + lse + a2a


def _a2a_extra(mb: MicroBatchShape, q_heads: int, kv_heads: int, d: int) -> int:
    """A CP all-to-all: the core keeps its head-sharded out and the output projection the
    sequence-sharded one (one tensor without it), and k, v with their kv heads repeated
    when the group has more ranks than kv heads (engine/context_parallel/ulysses.py).
    Selective recompute keeps neither: its checkpoint holds the core's sequence-sharded inputs."""
    if mb.cp_a2a == 1:
        return 0
    repeat = mb.cp_a2a // math.gcd(kv_heads, mb.cp_a2a)
    return mb.act_bytes * mb.tokens * d * (q_heads + 2 * (repeat - 1) * kv_heads)


def swiglu_bytes(mb: MicroBatchShape, hidden: int, ffn_local: int, *, with_input: bool = True) -> int:
    e, t = mb.act_bytes, mb.tokens
    return (e * t * hidden if with_input else 0) + 3 * e * t * ffn_local


def router_bytes(cfg: ModelConfig, mb: MicroBatchShape) -> int:
    """fp32 input copy, softmax / aux / z-loss [t_sp, E] tensors, top-k indices and weights."""
    t, moe = mb.sp_tokens, cfg.moe
    return (FP32 * t * cfg.hidden_size + 3 * FP32 * t * moe.num_experts
            + (INDEX_BYTES + FP32) * t * moe.top_k + FP32 * t)


def routed_bytes(cfg: ModelConfig, mb: MicroBatchShape, rows: DispatchRows, etp: int) -> int:
    """Assignment indices, expert inputs and internals, fp32 combine (engine/moe/)."""
    h, e = cfg.hidden_size, mb.act_bytes
    f_local = cfg.moe.ffn_hidden_size // etp
    indices = 2 * INDEX_BYTES * rows.assigned + 2 * INDEX_BYTES * rows.at_experts
    experts = e * rows.at_experts * h + 2 * e * rows.at_experts * f_local
    combine = e * rows.assigned * h + FP32 * rows.assigned     # y in its dtype, fp32 weights
    return indices + experts + combine


def unkept_bytes(cfg: ModelConfig, layer_id: int, mb: MicroBatchShape, rows: DispatchRows, etp: int) -> int:
    """Activations a layer's forward writes but does not keep (recomputed in backward, or
    temporaries): silu(gate) in every SwiGLU and the experts' product, the combine's fp32
    copy of the expert rows and their weighted sum. The elementwise ops touch them all the
    same (the cost model's elementwise term counts them with the kept bytes)."""
    e, t, moe = mb.act_bytes, mb.tokens, cfg.moe
    if not cfg.is_moe_layer(layer_id):
        return e * t * (cfg.ffn_hidden_size // mb.tp)
    out = 2 * e * rows.at_experts * (moe.ffn_hidden_size // etp) + (2 * FP32 - e) * rows.assigned * cfg.hidden_size
    if moe.num_shared_experts:
        out += e * t * (moe.num_shared_experts * moe.shared_ffn_hidden_size // mb.tp)
    return out


def ffn_bytes(cfg: ModelConfig, layer_id: int, mb: MicroBatchShape, rows: DispatchRows, etp: int) -> int:
    h, moe = cfg.hidden_size, cfg.moe
    if not cfg.is_moe_layer(layer_id):
        return norm_bytes(mb, h) + swiglu_bytes(mb, h, cfg.ffn_hidden_size // mb.tp)
    out = norm_bytes(mb, h) + router_bytes(cfg, mb) + routed_bytes(cfg, mb, rows, etp)
    if moe.num_shared_experts:
        # The shared expert reads the norm output: gathered under TP; at tp = 1 the router's
        # fp32 input is that same tensor in fp32, a separate bf16 one in bf16.
        separate_input = mb.tp > 1 or mb.act_bytes != FP32
        out += swiglu_bytes(mb, h, moe.num_shared_experts * moe.shared_ffn_hidden_size // mb.tp,
                            with_input=separate_input)
    return out


def layer_bytes(cfg: ModelConfig, layer_id: int, mb: MicroBatchShape, rows: DispatchRows,
                etp: int, recompute: str) -> int:
    """Bytes one layer keeps for backward for one micro-batch under `recompute`."""
    block_input = mb.act_bytes * mb.sp_tokens * cfg.hidden_size + INDEX_BYTES * mb.tokens
    if recompute == "full":
        return block_input
    attention = attention_bytes(cfg, mb, recompute)
    if recompute == "remat_aware":
        core = attention - norm_bytes(mb, cfg.hidden_size) - mb.act_bytes * mb.tokens * cfg.hidden_size
        return block_input + core - FP32 * mb.tokens * cfg.dim_head   # no RoPE tables kept
    return attention + ffn_bytes(cfg, layer_id, mb, rows, etp)


def rematerialised_bytes(cfg: ModelConfig, layer_id: int, mb: MicroBatchShape, rows: DispatchRows,
                         etp: int, recompute: str) -> int:
    """Working memory of re-running one layer's checkpointed segment in backward: the whole
    layer under `full`; under `remat_aware` the larger of its two segments (norm + QKV
    projections + RoPE before the core, output projection + FFN after it)."""
    if recompute == "full":
        return layer_bytes(cfg, layer_id, mb, rows, etp, "none")
    if recompute == "remat_aware":
        before = (norm_bytes(mb, cfg.hidden_size) + mb.act_bytes * mb.tokens * cfg.hidden_size
                  + FP32 * mb.tokens * cfg.dim_head)
        return max(before, ffn_bytes(cfg, layer_id, mb, rows, etp))
    return 0


def dispatcher_buffer_bytes(cfg: ModelConfig, mb: MicroBatchShape, rows: DispatchRows, etp: int) -> int:
    """Transient rows of one MoE layer's token exchange (engine/moe/comm.py), alive while the
    layer runs forward or backward: the permuted send rows and the received rows; with ETP
    also the all-gather's repeated send copy and the reduce-scatter's received partials."""
    if rows.gathered:    # all-gather: the repeated send copy and the gathered tokens (the
        exchanged = 2 * rows.gathered   # combine's buffer and received partials, likewise)
    else:
        exchanged = rows.assigned + rows.at_experts * (2 if etp > 1 else 1)
    return mb.act_bytes * cfg.hidden_size * exchanged


def embedding_bytes(mb: MicroBatchShape) -> int:
    """First chunk: token ids and the vocab-parallel lookup's mask (int64 + bool)."""
    return (INDEX_BYTES + 1) * mb.tokens


LOSS_ROW_CHUNK_ELEMS = 1 << 24    # engine.tensor_parallel.cross_entropy.GPU_ROW_CHUNK_ELEMS (CPU's is smaller)
LOSS_TOKEN_BYTES = 4 + 8 + 8 + 1 + 1   # row max, (sum-exp, target), label, two masks


def head_bytes(cfg: ModelConfig, mb: MicroBatchShape) -> int:
    """Last chunk: final norm, the head's (gathered) input, and what the chunked CE keeps:
    the logits in the model dtype and a few numbers per token (engine/tensor_parallel/
    cross_entropy.py)."""
    vocab_local = cfg.vocab_size // mb.tp
    return (norm_bytes(mb, cfg.hidden_size) + mb.act_bytes * mb.tokens * cfg.hidden_size
            + mb.act_bytes * mb.tokens * vocab_local + LOSS_TOKEN_BYTES * mb.tokens)


def loss_slice_bytes(cfg: ModelConfig, mb: MicroBatchShape) -> int:
    """One fp32 row slice of the chunked CE (its forward's only [rows, vocab] temporary)."""
    return FP32 * min(mb.tokens * (cfg.vocab_size // mb.tp), LOSS_ROW_CHUNK_ELEMS)


def loss_working_bytes(cfg: ModelConfig, mb: MicroBatchShape) -> int:
    """The loss backward beyond what the head keeps: the logits' gradient in the model
    dtype and one fp32 slice of the recomputed softmax."""
    return mb.act_bytes * mb.tokens * (cfg.vocab_size // mb.tp) + loss_slice_bytes(cfg, mb)
