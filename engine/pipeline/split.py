"""Split the layers into pp * vpp contiguous pipeline chunks of balanced cost.

Chunk c of virtual stage v on PP rank r is c = v * pp + r (Megatron interleaving); the
first chunk also holds the embedding, the last the final norm, head and loss. The lead
builds chunk c as MoETransformer(cfg, layer_ids=chunks[c], first_stage=c == 0,
last_stage=c == len(chunks) - 1), so parameter names stay global.

Cost = forward FLOPs per token (backward is ~2x forward for every part, so the ratio is
the same), counted like Megatron's FLOPs formula (reference.md, training.py):
- attention: 2h(n_h d + 2 n_kv d) projections in, 2 n_h d h out, and 2 s n_h d for the
  causal scores and values (4 s n_h d halved by the mask);
- dense FFN: 2 * 3 h F (SwiGLU); MoE FFN: router 2 h E + top_k * 2 * 3 h F_e routed
  + n_shared * 2 * 3 h F_s shared;
- head: 2 h V, loss ~ 4 V (max, exp, sum, log per logit); embedding: a lookup, counted
  as 2 h (memory-bound gather and grad scatter), i.e. nearly free.
"""
from __future__ import annotations

from engine.config.model import ModelConfig


def attention_cost(cfg: ModelConfig, seq_len: int) -> int:
    h, d = cfg.hidden_size, cfg.dim_head
    projections = 2 * h * (cfg.num_heads * d + 2 * cfg.num_kv_heads * d) + 2 * cfg.num_heads * d * h
    return projections + 2 * seq_len * cfg.num_heads * d


def ffn_cost(cfg: ModelConfig, layer_id: int) -> int:
    h, moe = cfg.hidden_size, cfg.moe
    if not cfg.is_moe_layer(layer_id):
        return 6 * h * cfg.ffn_hidden_size
    routed = moe.top_k * 6 * h * moe.ffn_hidden_size
    shared = moe.num_shared_experts * 6 * h * moe.shared_ffn_hidden_size
    return 2 * h * moe.num_experts + routed + shared


def layer_cost(cfg: ModelConfig, layer_id: int, seq_len: int) -> int:
    return attention_cost(cfg, seq_len) + ffn_cost(cfg, layer_id)


def embedding_cost(cfg: ModelConfig) -> int:
    return 2 * cfg.hidden_size


def head_cost(cfg: ModelConfig) -> int:
    return 2 * cfg.hidden_size * cfg.vocab_size + 4 * cfg.vocab_size


def chunk_costs(cfg: ModelConfig, chunks: list[list[int]], seq_len: int | None = None) -> list[int]:
    """Cost of each chunk (embedding on the first, head + loss on the last)."""
    seq_len = seq_len or cfg.max_seq_len
    costs = [sum(layer_cost(cfg, i, seq_len) for i in chunk) for chunk in chunks]
    costs[0] += embedding_cost(cfg)
    costs[-1] += head_cost(cfg)
    return costs


def split_layers(cfg: ModelConfig, pp: int, vpp: int = 1, seq_len: int | None = None) -> list[list[int]]:
    """Contiguous layer ids of each of the pp * vpp chunks (index = global chunk id),
    minimising the most expensive chunk, ties broken towards equal costs.
    seq_len: the training sequence length (default model.max_seq_len)."""
    num_chunks = pp * vpp
    if pp < 1 or vpp < 1:
        raise ValueError(f"parallel.pp={pp}, parallel.vpp={vpp}: must be >= 1")
    if cfg.num_layers < num_chunks:
        raise ValueError(
            f"parallel.pp={pp} x parallel.vpp={vpp} = {num_chunks} pipeline chunks but "
            f"model.num_layers={cfg.num_layers}: a chunk would be empty; lower pp or vpp")
    seq_len = seq_len or cfg.max_seq_len
    weights = [layer_cost(cfg, i, seq_len) for i in range(cfg.num_layers)]
    weights[0] += embedding_cost(cfg)
    weights[-1] += head_cost(cfg)
    bounds = _balanced_bounds(weights, num_chunks)
    return [list(range(lo, hi)) for lo, hi in zip(bounds, bounds[1:])]


def _balanced_bounds(weights: list[int], parts: int) -> list[int]:
    """Boundaries 0 = b0 < ... < b_parts = n of the contiguous partition that minimises
    (max part, sum of squared parts), by dynamic programming over prefixes: O(parts n^2)."""
    n = len(weights)
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    # best[k][j]: (max, sum of squares, previous bound) for the first j layers in k parts
    best = [[None] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = (0, 0, 0)
    for k in range(1, parts + 1):
        for j in range(k, n - (parts - k) + 1):
            for i in range(k - 1, j):
                if best[k - 1][i] is None:
                    continue
                part = prefix[j] - prefix[i]
                prev_max, prev_sq, _ = best[k - 1][i]
                cand = (max(prev_max, part), prev_sq + part * part, i)
                if best[k][j] is None or cand[:2] < best[k][j][:2]:
                    best[k][j] = cand
    bounds, j = [n], n
    for k in range(parts, 0, -1):
        j = best[k][j][2]
        bounds.append(j)
    return bounds[::-1]
