"""Parameters one rank holds: the shard sizes of every plan, counted from the shapes alone.

Mirrors what the parallel plans keep on a rank (engine/tensor_parallel/plan.py,
engine/moe/parallelize.py, engine/pipeline/split.py):
- attention: wq / wo split by q heads over TP; wk / wv by kv heads, or one replicated kv
  head per rank when num_kv_heads < tp; qkv biases follow their weights; norms replicated;
- dense FFN and shared experts: gate / up / down split over TP along F;
- routed experts: E/ep experts of F/etp each (the MoE mesh, independent of TP);
- router: replicated (a dense, sequence-parallel parameter);
- embedding (first chunk) and head (last chunk) split over TP by vocabulary; a tied
  embedding is held by the first and the last stage when pp > 1; final norm on the last.
"dense" parameters reduce (and shard under ZeRO-1) over dp x cp, "expert" ones over edp.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.models.config import ModelConfig
from engine.parallel.config import ParallelConfig


@dataclass(frozen=True)
class ParamCount:
    """Elements of one rank's parameters by reduction group."""
    dense: int = 0
    expert: int = 0

    def __add__(self, other: "ParamCount") -> "ParamCount":
        return ParamCount(self.dense + other.dense, self.expert + other.expert)

    @property
    def total(self) -> int:
        return self.dense + self.expert


def local_kv_heads(num_kv_heads: int, tp: int) -> int:
    """kv heads per TP rank; one replicated head when there are fewer kv heads than ranks."""
    return num_kv_heads // tp if num_kv_heads >= tp else 1


def attention_params(cfg: ModelConfig, tp: int) -> int:
    h, d = cfg.hidden_size, cfg.dim_head
    q_heads, kv_heads = cfg.num_heads // tp, local_kv_heads(cfg.num_kv_heads, tp)
    weights = h * d * (2 * q_heads + 2 * kv_heads)          # wq, wo, wk, wv
    bias = d * (q_heads + 2 * kv_heads) if cfg.qkv_bias else 0
    return weights + bias + 2 * h                            # + attn_norm, ffn_norm


def ffn_params(cfg: ModelConfig, layer_id: int, p: ParallelConfig) -> ParamCount:
    h, moe = cfg.hidden_size, cfg.moe
    if not cfg.is_moe_layer(layer_id):
        return ParamCount(dense=3 * h * cfg.ffn_hidden_size // p.tp)
    shared = 3 * h * moe.num_shared_experts * moe.shared_ffn_hidden_size // p.tp
    experts = (moe.num_experts // p.ep) * 3 * h * (moe.ffn_hidden_size // p.etp)
    return ParamCount(dense=shared + h * moe.num_experts, expert=experts)


def layer_params(cfg: ModelConfig, layer_id: int, p: ParallelConfig) -> ParamCount:
    return ParamCount(dense=attention_params(cfg, p.tp)) + ffn_params(cfg, layer_id, p)


def chunk_layers(cfg: ModelConfig, p: ParallelConfig, seq_len: int) -> list[list[int]]:
    """Layer ids of every global chunk (index v * pp + r), as the engine splits them."""
    if p.pp * p.vpp == 1:
        return [list(range(cfg.num_layers))]
    from engine.pipeline.split import split_layers
    return split_layers(cfg, p.pp, p.vpp, seq_len=seq_len)


def chunk_ends(cfg: ModelConfig, chunk: int, num_chunks: int, tp: int) -> int:
    """Embedding / head / final-norm elements that chunk `chunk` holds."""
    table = cfg.vocab_size * cfg.hidden_size // tp
    first, last = chunk == 0, chunk == num_chunks - 1
    count = 0
    if first or (last and cfg.tie_embeddings):
        count += table                     # the embedding (a tied copy on the last stage)
    if last:
        count += cfg.hidden_size + (0 if cfg.tie_embeddings else table)
    return count


def stage_params(cfg: ModelConfig, p: ParallelConfig, chunks: list[list[int]], pp_rank: int) -> ParamCount:
    """Everything PP rank `pp_rank` holds: its vpp chunks v * pp + pp_rank."""
    total, num_chunks = ParamCount(), len(chunks)
    for v in range(p.vpp):
        chunk = v * p.pp + pp_rank
        total += ParamCount(dense=chunk_ends(cfg, chunk, num_chunks, p.tp))
        for layer_id in chunks[chunk]:
            total += layer_params(cfg, layer_id, p)
    return total


def largest_params(cfg: ModelConfig, p: ParallelConfig, chunks: list[list[int]], pp_rank: int
                   ) -> ParamCount:
    """The largest single dense and expert parameter tensor on PP rank `pp_rank` (elements):
    a bucket of the distributed optimizer is at least that big (engine/optim/buckets.py)."""
    h, d, moe = cfg.hidden_size, cfg.dim_head, cfg.moe
    own = [i for v in range(p.vpp) for i in chunks[v * p.pp + pp_rank]]
    dense = max(h * d * cfg.num_heads // p.tp, h * cfg.ffn_hidden_size // p.tp if cfg.first_k_dense else 0,
                h * moe.num_shared_experts * moe.shared_ffn_hidden_size // p.tp)
    ends = [chunk_ends(cfg, v * p.pp + pp_rank, len(chunks), p.tp) for v in range(p.vpp)]
    if any(ends):
        dense = max(dense, cfg.vocab_size * h // p.tp)
    has_moe = any(cfg.is_moe_layer(i) for i in own)
    expert = (moe.num_experts // p.ep) * h * (moe.ffn_hidden_size // p.etp) if has_moe else 0
    return ParamCount(dense=dense, expert=expert)
