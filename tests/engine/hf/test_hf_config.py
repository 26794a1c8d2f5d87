"""Export's config.json: a model that an HF family cannot compute is refused with what is
missing (it would load in transformers and compute something else), and the import refuses
what foldmoe cannot compute."""
from dataclasses import replace

import pytest
import torch

from engine.config.model import ModelConfig, MoEConfig
from engine.hf.config import HFConfigError, hf_config_from_model, model_config_from_hf, model_type_of
from engine.moe.router import route_topk

MIXTRAL = ModelConfig(first_k_dense=0, moe=MoEConfig(num_experts=4, top_k=2))
QWEN2 = ModelConfig(first_k_dense=0, qkv_bias=True,
                    moe=MoEConfig(num_experts=4, top_k=2, num_shared_experts=1, shared_ffn_hidden_size=32,
                                  shared_expert_gate=True, pre_softmax=True, norm_topk_prob=False))
QWEN3 = ModelConfig(first_k_dense=0, qk_norm=True,
                    moe=MoEConfig(num_experts=4, top_k=2, pre_softmax=True, norm_topk_prob=True))


def _moe(cfg, **fields):
    return replace(cfg, moe=replace(cfg.moe, **fields))


@pytest.mark.parametrize("cfg,family", [(MIXTRAL, "mixtral"), (QWEN2, "qwen2_moe"), (QWEN3, "qwen3_moe"),
                                        (replace(MIXTRAL, first_k_dense=1), "qwen2_moe"),
                                        (_moe(MIXTRAL, pre_softmax=True, norm_topk_prob=True), "mixtral")])
def test_each_family_exports_what_it_expresses(cfg, family):
    assert model_type_of(cfg) == family
    out = hf_config_from_model(cfg, family)
    assert out["model_type"] == family
    # transformers 4.x reads the top-level rope_theta; 5.x reads rope_parameters
    assert out["rope_theta"] == out["rope_parameters"]["rope_theta"] == cfg.rope_theta


@pytest.mark.parametrize("cfg,family,missing", [
    (_moe(MIXTRAL, score_func="sigmoid"), None, "score_func='sigmoid'"),
    (_moe(QWEN2, expert_bias=True), None, "expert_bias"),
    (_moe(QWEN2, shared_expert_gate=False), None, "shared expert without its sigmoid gate"),
    (_moe(QWEN2, num_shared_experts=2), None, "2 shared experts"),
    (replace(QWEN2, qk_norm=True), "qwen2_moe", "q/k norm"),
    (replace(MIXTRAL, qkv_bias=True), "mixtral", "q/k/v biases"),
    (replace(QWEN3, qkv_bias=True), None, "q/k/v biases"),
    (MIXTRAL, "qwen3_moe", "no q/k norm"),
    (_moe(MIXTRAL, pre_softmax=True, norm_topk_prob=False), "mixtral", "without renormalising"),
    (replace(MIXTRAL, first_k_dense=1), "mixtral", "1 dense FFN layers"),
])
def test_what_a_family_cannot_compute_is_refused(cfg, family, missing):
    family = family or model_type_of(cfg)
    with pytest.raises(HFConfigError, match=rf"{family} cannot express .*{missing}"):
        hf_config_from_model(cfg, family)


def test_top_k_logit_softmax_is_the_renormalised_full_softmax():
    # Why a pre_softmax=False model exports to Qwen as norm_topk_prob=True (and a
    # pre_softmax=True, norm_topk_prob=True one to Mixtral).
    logits_te = torch.randn(64, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mixtral = route_topk(logits_te, 3, pre_softmax=False)
    qwen = route_topk(logits_te, 3, pre_softmax=True, norm_topk_prob=True)
    assert torch.equal(mixtral[1], qwen[1])
    torch.testing.assert_close(mixtral[0], qwen[0], rtol=1e-14, atol=0)
    assert hf_config_from_model(MIXTRAL, "qwen2_moe")["norm_topk_prob"] is True


def test_import_refuses_a_qwen3_o_proj_bias():
    hf = hf_config_from_model(QWEN3, "qwen3_moe")
    assert model_config_from_hf(hf).qk_norm
    with pytest.raises(HFConfigError, match="attention_bias=true"):
        model_config_from_hf({**hf, "attention_bias": True})
