"""Hugging Face `config.json` <-> ModelConfig for Mixtral, Qwen2-MoE and Qwen3-MoE."""
from __future__ import annotations

import json
import os

from engine.config.model import ModelConfig, MoEConfig

ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM"}


class HFConfigError(ValueError):
    """config.json cannot be expressed as a foldmoe model."""


def read_hf_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise HFConfigError(f"model.init_from={model_dir!r}: no config.json there")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _rope_theta(hf: dict) -> float:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise HFConfigError(f"rope_type {kind!r}: only default RoPE is supported")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_config_from_hf(hf: dict) -> ModelConfig:
    """The foldmoe ModelConfig with the shapes and routing rule of an HF config."""
    kind = hf.get("model_type")
    if kind not in ARCHITECTURES:
        raise HFConfigError(f"model_type {kind!r}: supported are {sorted(ARCHITECTURES)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise HFConfigError(f"hidden_act {hf['hidden_act']!r}: only silu (SwiGLU) is supported")
    if hf.get("use_sliding_window") or (kind == "mixtral" and hf.get("sliding_window")):
        raise HFConfigError("sliding-window attention is not supported")
    num_experts = hf.get("num_local_experts", hf.get("num_experts"))
    top_k = hf["num_experts_per_tok"]
    aux_coeff = float(hf.get("router_aux_loss_coef", 0.0))
    common = dict(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                  num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
                  num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                  head_dim=hf.get("head_dim"), ffn_hidden_size=hf["intermediate_size"],
                  first_k_dense=0, rope_theta=_rope_theta(hf), norm_eps=float(hf["rms_norm_eps"]),
                  tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                  init_std=float(hf.get("initializer_range", 0.02)),
                  max_seq_len=int(hf.get("max_position_embeddings", 4096)))
    if kind == "mixtral":
        # softmax over the k selected logits == softmax over all, renormalised over the k.
        moe = MoEConfig(num_experts=num_experts, top_k=top_k, ffn_hidden_size=hf["intermediate_size"],
                        pre_softmax=False, aux_loss_coeff=aux_coeff)
        return ModelConfig(**common, moe=moe)
    shared = int(hf.get("shared_expert_intermediate_size") or 0)
    moe = MoEConfig(num_experts=num_experts, top_k=top_k, ffn_hidden_size=hf["moe_intermediate_size"],
                    num_shared_experts=1 if shared else 0, shared_ffn_hidden_size=shared,
                    shared_expert_gate=bool(shared), pre_softmax=True,
                    norm_topk_prob=bool(hf.get("norm_topk_prob", False)), aux_loss_coeff=aux_coeff)
    if kind == "qwen3_moe" and hf.get("attention_bias"):
        # HF's Qwen3-MoE then also puts a bias on o_proj, which foldmoe's attention lacks.
        raise HFConfigError("qwen3_moe with attention_bias=true (an o_proj bias) is not supported")
    bias = hf.get("qkv_bias", True) if kind == "qwen2_moe" else False
    return ModelConfig(**common, moe=moe, qkv_bias=bool(bias), qk_norm=kind == "qwen3_moe",
                       moe_layer_step=int(hf.get("decoder_sparse_step", 1)),
                       dense_layers=tuple(hf.get("mlp_only_layers") or ()))


def inexpressible(cfg: ModelConfig, model_type: str) -> list[str]:
    """What of `cfg` the HF family `model_type` cannot compute; exporting it anyway would
    give a model that loads but computes something else."""
    moe, qwen = cfg.moe, model_type != "mixtral"
    found = [reason for reason, bad in (
        (f"score_func={moe.score_func!r} (the HF families route with softmax)", moe.score_func != "softmax"),
        ("the aux-loss-free selection bias (moe.expert_bias)", moe.expert_bias),
        (f"{moe.num_shared_experts} shared experts", moe.num_shared_experts > (model_type == "qwen2_moe")),
        ("a shared expert without its sigmoid gate (qwen2_moe always gates it)",
         model_type == "qwen2_moe" and moe.num_shared_experts and not moe.shared_expert_gate),
        (f"{cfg.num_dense_layers} dense FFN layers", model_type == "mixtral" and cfg.num_dense_layers),
        ("q/k norm" if cfg.qk_norm else "no q/k norm", cfg.qk_norm != (model_type == "qwen3_moe")),
        ("q/k/v biases", cfg.qkv_bias and model_type != "qwen2_moe"),
        # Mixtral's softmax over the k selected logits is pre-softmax renormalised over k.
        ("softmax over all experts without renormalising the k selected",
         not qwen and moe.pre_softmax and not moe.norm_topk_prob),
    ) if bad]
    return found


def hf_config_from_model(cfg: ModelConfig, model_type: str) -> dict:
    """An HF config.json dict for `cfg` (the inverse of model_config_from_hf). Besides the
    transformers 5 keys it writes the top-level rope_theta and torch_dtype that 4.x reads."""
    if model_type not in ARCHITECTURES:
        raise HFConfigError(f"model_type {model_type!r}: supported are {sorted(ARCHITECTURES)}")
    missing = inexpressible(cfg, model_type)
    if missing:
        raise HFConfigError(f"{model_type} cannot express this model's {'; '.join(missing)}")
    moe = cfg.moe
    out = {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
           "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
           "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
           "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.dim_head,
           "intermediate_size": cfg.ffn_hidden_size, "hidden_act": "silu",
           "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
           "initializer_range": cfg.init_std, "max_position_embeddings": cfg.max_seq_len,
           "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
           "rope_theta": cfg.rope_theta,
           "num_experts_per_tok": moe.top_k, "router_aux_loss_coef": moe.aux_loss_coeff,
           "output_router_logits": False, "dtype": "float32"}
    if model_type == "mixtral":
        return {**out, "num_local_experts": moe.num_experts, "intermediate_size": moe.ffn_hidden_size}
    dense = [i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i)]
    step = cfg.moe_layer_step
    # Top-k softmax logits (pre_softmax=False) = the full softmax renormalised over the k.
    out.update(num_experts=moe.num_experts, moe_intermediate_size=moe.ffn_hidden_size,
               norm_topk_prob=moe.norm_topk_prob or not moe.pre_softmax, decoder_sparse_step=step,
               mlp_only_layers=[i for i in dense if (i + 1) % step == 0])
    if model_type == "qwen2_moe":
        out.update(qkv_bias=cfg.qkv_bias, shared_expert_intermediate_size=moe.shared_ffn_hidden_size)
    else:
        out.update(attention_bias=False)
    return out


def model_type_of(cfg: ModelConfig) -> str:
    """The HF family a foldmoe model is exported as (hf_config_from_model then says what,
    if anything, that family cannot express)."""
    if cfg.qk_norm:
        return "qwen3_moe"
    if cfg.moe.num_shared_experts or cfg.qkv_bias or cfg.num_dense_layers or \
            (cfg.moe.pre_softmax and not cfg.moe.norm_topk_prob):
        return "qwen2_moe"
    return "mixtral"
