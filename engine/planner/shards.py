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
from functools import lru_cache

from engine.config.model import ModelConfig
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
    qk_norm = 2 * d if cfg.qk_norm else 0                    # Qwen3: per-head q/k RMSNorm (replicated)
    return weights + bias + qk_norm + 2 * h                  # + attn_norm, ffn_norm


def ffn_params(cfg: ModelConfig, layer_id: int, p: ParallelConfig) -> ParamCount:
    h, moe = cfg.hidden_size, cfg.moe
    if not cfg.is_moe_layer(layer_id):
        return ParamCount(dense=3 * h * cfg.ffn_hidden_size // p.tp)
    shared = 3 * h * moe.num_shared_experts * moe.shared_ffn_hidden_size // p.tp
    gate = h if moe.shared_expert_gate and moe.num_shared_experts else 0   # Qwen2-MoE, replicated
    experts = (moe.num_experts // p.ep) * 3 * h * (moe.ffn_hidden_size // p.etp)
    return ParamCount(dense=shared + gate + h * moe.num_experts, expert=experts)


def layer_params(cfg: ModelConfig, layer_id: int, p: ParallelConfig) -> ParamCount:
    return _layer_kind_params(cfg, cfg.is_moe_layer(layer_id), p.tp, p.ep, p.etp)


@lru_cache(maxsize=256)
def kind_layer_id(cfg: ModelConfig, is_moe: bool) -> int:
    """The first layer of that kind (MoE or dense FFN); per-layer costs and bytes depend on
    the layer only through its kind. first_k_dense alone does not locate one: with
    moe_layer_step > 1 or dense_layers, layer first_k_dense may be dense and layer 0 MoE.
    0 when the model has no layer of that kind (its count is then 0 wherever it is used)."""
    return next((i for i in range(cfg.num_layers) if cfg.is_moe_layer(i) == is_moe), 0)


@lru_cache(maxsize=4096)
def _layer_kind_params(cfg: ModelConfig, is_moe: bool, tp: int, ep: int, etp: int) -> ParamCount:
    p = ParallelConfig(world_size=tp * ep * etp, tp=tp, ep=ep, etp=etp)
    layer_id = kind_layer_id(cfg, is_moe)
    return ParamCount(dense=attention_params(cfg, tp)) + ffn_params(cfg, layer_id, p)


def chunk_layers(cfg: ModelConfig, p: ParallelConfig, seq_len: int) -> list[list[int]]:
    """Layer ids of every global chunk (index v * pp + r), as the engine splits them."""
    return [list(c) for c in _split(cfg, p.pp, p.vpp, seq_len)]


@lru_cache(maxsize=1024)
def _split(cfg: ModelConfig, pp: int, vpp: int, seq_len: int) -> tuple[tuple[int, ...], ...]:
    if pp * vpp == 1:
        return (tuple(range(cfg.num_layers)),)
    from engine.pipeline.split import split_layers
    return tuple(tuple(c) for c in split_layers(cfg, pp, vpp, seq_len=seq_len))


@dataclass(frozen=True)
class ChunkKinds:
    """What a pipeline chunk holds, which is all its costs depend on."""
    dense: int          # dense-FFN layers
    moe: int            # MoE layers
    first: bool         # chunk 0: the embedding
    last: bool          # the last chunk: final norm, head, loss

    @property
    def layers(self) -> int:
        return self.dense + self.moe


def summarize(kinds: tuple[ChunkKinds, ...]) -> ChunkKinds:
    """All chunks of a rank as one: per-rank parameter counts and stage times are linear in
    the layers, and the ends are flags."""
    return ChunkKinds(sum(k.dense for k in kinds), sum(k.moe for k in kinds),
                      any(k.first for k in kinds), any(k.last for k in kinds))


@lru_cache(maxsize=1024)
def rank_chunks(cfg: ModelConfig, pp: int, vpp: int, seq_len: int) -> tuple[tuple[ChunkKinds, ...], ...]:
    """Per PP rank, its vpp chunks (virtual-stage order) as ChunkKinds."""
    chunks = _split(cfg, pp, vpp, seq_len)
    def kinds(c: int) -> ChunkKinds:
        moe = sum(1 for i in chunks[c] if cfg.is_moe_layer(i))
        return ChunkKinds(len(chunks[c]) - moe, moe, c == 0, c == len(chunks) - 1)
    return tuple(tuple(kinds(v * pp + r) for v in range(vpp)) for r in range(pp))


def chunk_ends(cfg: ModelConfig, chunk: int, num_chunks: int, tp: int) -> int:
    """Embedding / head / final-norm elements that chunk `chunk` holds."""
    return _ends(cfg, chunk == 0, chunk == num_chunks - 1, tp)


def _ends(cfg: ModelConfig, first: bool, last: bool, tp: int) -> int:
    table = cfg.vocab_size * cfg.hidden_size // tp
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


def rank_params(cfg: ModelConfig, p: ParallelConfig, kinds: tuple[ChunkKinds, ...]) -> ParamCount:
    """stage_params from the rank's ChunkKinds (the planner's fast path; same counts)."""
    dense_layer = _layer_kind_params(cfg, False, p.tp, p.ep, p.etp)
    moe_layer = _layer_kind_params(cfg, True, p.tp, p.ep, p.etp)
    n_dense = sum(k.dense for k in kinds)
    n_moe = sum(k.moe for k in kinds)
    ends = sum(_ends(cfg, k.first, k.last, p.tp) for k in kinds)
    return ParamCount(dense=n_dense * dense_layer.dense + n_moe * moe_layer.dense + ends,
                      expert=n_dense * dense_layer.expert + n_moe * moe_layer.expert)


def largest_params(cfg: ModelConfig, p: ParallelConfig, kinds: tuple[ChunkKinds, ...]) -> ParamCount:
    """The largest single dense and expert parameter tensor on a PP rank (elements): a
    bucket of the distributed optimizer is at least that big (engine/optim/buckets.py)."""
    h, d, moe = cfg.hidden_size, cfg.dim_head, cfg.moe
    dense = max(h * d * cfg.num_heads // p.tp, h * cfg.ffn_hidden_size // p.tp if cfg.num_dense_layers else 0,
                h * moe.num_shared_experts * moe.shared_ffn_hidden_size // p.tp)
    if any(k.first or k.last for k in kinds):
        dense = max(dense, cfg.vocab_size * h // p.tp)
    has_moe = any(k.moe for k in kinds)
    expert = (moe.num_experts // p.ep) * h * (moe.ffn_hidden_size // p.etp) if has_moe else 0
    return ParamCount(dense=dense, expert=expert)
