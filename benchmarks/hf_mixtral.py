"""The same weights in transformers' MixtralForCausalLM and in a foldmoe model.

foldmoe's RoPE rotates pairs (2i, 2i+1) of each head; Hugging Face's rotates halves
(i, i + d/2). Permuting the output rows of wq and wk per head (pair i -> rows i and
i + d/2) makes q.k identical, so the two models compute the same function. Experts:
foldmoe stacks w_gate/w_up [E, h, F] and w_down [E, F, h]; transformers 5 keeps
gate_up_proj [E, 2F, h] (gate rows first) and down_proj [E, h, F].
"""
from __future__ import annotations

import torch

from engine.config.model import ModelConfig


def hf_config(cfg: ModelConfig):
    from transformers import MixtralConfig
    moe = cfg.moe
    if cfg.first_k_dense or moe.num_shared_experts or cfg.qkv_bias or cfg.tie_embeddings:
        raise ValueError("Mixtral has no dense layers, shared experts, qkv bias or tied embeddings")
    if moe.score_func != "softmax" or moe.pre_softmax or moe.capacity_factor is not None:
        raise ValueError("Mixtral routes by softmax over the top-k logits, dropless")
    return MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=moe.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.dim_head, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len,
        num_local_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
        router_aux_loss_coef=moe.aux_loss_coeff, output_router_logits=moe.aux_loss_type != "none",
        sliding_window=None, attention_dropout=0.0, tie_word_embeddings=False)


def pairs_to_halves(w_rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of a q/k projection [n*d, h]: per head, even rows first, then odd rows."""
    n = w_rows.shape[0] // head_dim
    w = w_rows.view(n, head_dim // 2, 2, -1)
    return w.transpose(1, 2).reshape(w_rows.shape)


@torch.no_grad()
def to_hf_state_dict(named_params: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    d = cfg.dim_head
    out = {"model.embed_tokens.weight": named_params["embed.weight"],
           "model.norm.weight": named_params["norm.weight"],
           "lm_head.weight": named_params["head.weight"]}
    for i in range(cfg.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        p = {k[len(src):]: v for k, v in named_params.items() if k.startswith(src)}
        out[dst + "input_layernorm.weight"] = p["attn_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = p["ffn_norm.weight"]
        out[dst + "self_attn.q_proj.weight"] = pairs_to_halves(p["attention.wq.weight"], d)
        out[dst + "self_attn.k_proj.weight"] = pairs_to_halves(p["attention.wk.weight"], d)
        out[dst + "self_attn.v_proj.weight"] = p["attention.wv.weight"]
        out[dst + "self_attn.o_proj.weight"] = p["attention.wo.weight"]
        out[dst + "mlp.gate.weight"] = p["ffn.router.weight"]
        gate_up_ehf = torch.cat([p["ffn.experts.w_gate"], p["ffn.experts.w_up"]], dim=2)
        out[dst + "mlp.experts.gate_up_proj"] = gate_up_ehf.transpose(1, 2)
        out[dst + "mlp.experts.down_proj"] = p["ffn.experts.w_down"].transpose(1, 2)
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def build_hf_model(cfg: ModelConfig, named_params: dict[str, torch.Tensor], experts_implementation: str):
    from transformers import MixtralForCausalLM
    model = MixtralForCausalLM._from_config(hf_config(cfg), attn_implementation="sdpa",
                                            experts_implementation=experts_implementation)
    missing, unexpected = model.load_state_dict(to_hf_state_dict(named_params, cfg), strict=False)
    missing = [k for k in missing if "rotary" not in k]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping incomplete: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model.float().train()
