"""The published presets as HF configs: transformers builds (on the meta device) a model with
exactly the parameter count foldmoe computes from the shapes, and that matches the published
figure; the config round trip HF -> foldmoe keeps every shape."""
import dataclasses

import pytest
import torch

pytest.importorskip("transformers")

from engine.config.model import get_preset
from engine.hf.config import hf_config_from_model, model_config_from_hf, model_type_of
from engine.models.transformer import count_parameters

# Published totals (model cards), in billions, rounded as published.
PUBLISHED = {"mixtral-8x7b": 46.7, "mixtral-8x22b": 141, "qwen2-57b-a14b": 57.4, "qwen3-30b-a3b": 30.5}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_preset_parameter_count_matches_transformers_and_the_model_card(preset):
    import transformers as tf
    cfg = get_preset(preset)
    hf = hf_config_from_model(cfg, model_type_of(cfg))
    config = tf.AutoConfig.for_model(hf.pop("model_type"), **hf)
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config)
    hf_total = sum(p.numel() for p in model.parameters())
    assert count_parameters(cfg)["total"] == hf_total
    digits = len(str(PUBLISHED[preset]).split(".")[-1]) if "." in str(PUBLISHED[preset]) else 0
    assert round(hf_total / 1e9, digits) == PUBLISHED[preset], hf_total
    back = model_config_from_hf({**hf, "model_type": model_type_of(cfg)})
    shape_fields = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "dim_head",
                    "ffn_hidden_size", "qkv_bias", "qk_norm", "tie_embeddings", "num_moe_layers")
    assert all(getattr(back, f) == getattr(cfg, f) for f in shape_fields)
    assert dataclasses.replace(back.moe, aux_loss_coeff=cfg.moe.aux_loss_coeff) == cfg.moe


def test_qwen2_57b_has_the_shared_expert_gate():
    cfg = get_preset("qwen2-57b-a14b")
    assert cfg.moe.shared_expert_gate and cfg.moe.num_shared_experts == 1
    assert model_type_of(cfg) == "qwen2_moe"
