"""Model FLOPs per training iteration (Megatron-LM's `num_floating_point_operations`).

FLOPs = T·[6h(g·F·L_dense + g·F_e·k·L_moe + g·F_s·L_moe) + 6L(h(n_h·d + 2·n_g·d) + n_h·d·h)
        + 6hV] + 6·B·s²·L·n_h·d
T = B·s tokens, g = 3 (SwiGLU: gate, up, down), d = head dim, n_g = KV heads, F_s = total
shared-expert hidden size. 6 = 2 (multiply-add) x 3 (forward + two backward GEMMs). The last
term is QKᵀ and AV (12·B·s²·n_h·d per layer) halved for the causal mask. Not counted: the
router GEMM, norms, softmax, the embedding lookup. These are "model" FLOPs: recomputation
does not add to them, so MFU stays comparable across recompute settings.
"""
from __future__ import annotations

from engine.config.model import ModelConfig

SWIGLU_GEMMS = 3


def ffn_flops_per_token(cfg: ModelConfig) -> int:
    """6h·g·(F·L_dense + F_e·k·L_moe + F_s·L_moe)."""
    moe = cfg.moe
    shared_hidden = moe.num_shared_experts * moe.shared_ffn_hidden_size
    dense = cfg.ffn_hidden_size * cfg.num_dense_layers
    routed = moe.ffn_hidden_size * moe.top_k * cfg.num_moe_layers
    shared = shared_hidden * cfg.num_moe_layers
    return 6 * cfg.hidden_size * SWIGLU_GEMMS * (dense + routed + shared)


def attention_projection_flops_per_token(cfg: ModelConfig) -> int:
    """6L(h(n_h·d + 2·n_g·d) + n_h·d·h): the Q/K/V and output projections."""
    h, d = cfg.hidden_size, cfg.dim_head
    qkv = h * (cfg.num_heads * d + 2 * cfg.num_kv_heads * d)
    out = cfg.num_heads * d * h
    return 6 * cfg.num_layers * (qkv + out)


def logits_flops_per_token(cfg: ModelConfig) -> int:
    """6hV: the output head."""
    return 6 * cfg.hidden_size * cfg.vocab_size


def attention_score_flops(cfg: ModelConfig, global_batch_size: int, seq_len: int) -> int:
    """6·B·s²·L·n_h·d: QKᵀ and AV, causal (already halved)."""
    return 6 * global_batch_size * seq_len ** 2 * cfg.num_layers * cfg.num_heads * cfg.dim_head


def model_flops_per_iteration(cfg: ModelConfig, global_batch_size: int, seq_len: int) -> float:
    """Training FLOPs of one optimizer step over the whole global batch (all ranks)."""
    if global_batch_size < 1 or seq_len < 1:
        raise ValueError(f"global_batch_size={global_batch_size}, seq_len={seq_len}: must be >= 1")
    tokens = global_batch_size * seq_len
    per_token = (ffn_flops_per_token(cfg) + attention_projection_flops_per_token(cfg)
                 + logits_flops_per_token(cfg))
    return float(tokens * per_token + attention_score_flops(cfg, global_batch_size, seq_len))
