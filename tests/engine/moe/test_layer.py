"""MoELayer against a per-token loop, zero-token cases, statistics, recompute and expert bias."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from engine.config.model import MoEConfig, get_preset
from engine.models.init import init_weights
from engine.models.transformer import MoETransformer
from engine.moe.layer import MoELayer
from engine.moe.dispatcher_local import LocalDispatcher
from engine.moe.tracking import (finalize_routing_stats, moe_layers, moe_stats, set_aux_loss_scale,
                                 update_expert_biases)

from .last_stats import last_stats

HIDDEN = 8


def _layer(**kw) -> MoELayer:
    torch.manual_seed(0)
    cfg = dict(num_experts=4, top_k=2, ffn_hidden_size=6, aux_loss_type="none")
    cfg.update(kw)
    layer = MoELayer(HIDDEN, MoEConfig(**cfg))
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.normal_(std=0.3)
    return layer


def _per_token_reference(layer: MoELayer, x_bsh: torch.Tensor) -> torch.Tensor:
    """Loop over tokens: y = sum over the k chosen experts of weight * SwiGLU_e(x) + shared(x)."""
    cfg, ex = layer.cfg, layer.experts
    out = torch.zeros_like(x_bsh)
    for index in torch.cartesian_prod(torch.arange(x_bsh.shape[0]), torch.arange(x_bsh.shape[1])):
        b, s = index.tolist()
        x = x_bsh[b, s]
        logits = layer.router.weight @ x
        scores = logits.softmax(-1) if cfg.score_func == "softmax" else logits.sigmoid()
        chosen = scores.topk(cfg.top_k).indices
        weights = scores[chosen] / scores[chosen].sum()      # configs below renormalise
        for w, e in zip(weights, chosen.tolist()):
            out[b, s] += w * ((F.silu(x @ ex.w_gate[e]) * (x @ ex.w_up[e])) @ ex.w_down[e])
    if layer.shared_experts is not None:
        out = out + layer.shared_experts(x_bsh)
    return out


@pytest.mark.parametrize("kw", [dict(), dict(score_func="sigmoid"),
                                dict(pre_softmax=True, num_shared_experts=1, shared_ffn_hidden_size=4)])
def test_matches_per_token_loop(kw):
    layer = _layer(**kw)
    x = torch.randn(2, 3, HIDDEN)
    # fp32, different summation order (grouped matmul vs per-token): ~1e-7 abs here.
    torch.testing.assert_close(layer(x), _per_token_reference(layer, x), rtol=1e-5, atol=1e-6)


def test_zero_token_experts_get_zero_gradients():
    layer = _layer()
    with torch.no_grad():
        layer.router.weight.zero_()     # all ties -> experts 0 and 1 for every token
    layer(torch.randn(2, 3, HIDDEN)).sum().backward()
    grad = layer.experts.w_gate.grad
    assert grad is not None and grad[2:].abs().max() == 0 and grad[:2].abs().max() > 0


def test_rank_with_zero_local_tokens():
    layer = _layer(capacity_factor=1.0, pad_to_capacity=True, aux_loss_type="seq", z_loss_coeff=1e-3)
    x = torch.randn(2, 0, HIDDEN, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == (2, 0, HIDDEN)
    assert layer.experts.w_up.grad.abs().max() == 0
    assert last_stats(layer)["dropped_token_fraction"] == 0.0


def test_stats_by_hand_with_uniform_router():
    # Zero router: every token picks experts 0, 1; P = 1/4 each, f = [.5, .5, 0, 0]:
    # aux = 4 * (.5 * .25 + .5 * .25) = 1; z = lse(0,0,0,0)^2 = ln(4)^2; imbalance = max/mean = 2.
    layer = _layer(aux_loss_type="switch")
    with torch.no_grad():
        layer.router.weight.zero_()
    layer(torch.randn(2, 3, HIDDEN))
    layer(torch.randn(1, 4, HIDDEN))
    assert last_stats(layer)["tokens_per_expert"].tolist() == [4, 4, 0, 0]
    stats = moe_stats(layer)
    assert math.isclose(stats["aux_loss"], 1.0, rel_tol=1e-6)
    assert math.isclose(stats["z_loss"], math.log(4.0) ** 2, rel_tol=1e-6)
    assert stats["load_imbalance"] == 2.0 and stats["dropped_token_fraction"] == 0.0
    assert moe_stats(layer) == {}       # reset after reading
    assert isinstance(layer.dispatcher, LocalDispatcher)   # all experts here: nothing sent


def test_dropped_fraction():
    # 6 tokens, E=4, k=2, cf=0.5: capacity = ceil(6*2/4*0.5) = 2; all 12 picks go to
    # experts 0 and 1, each keeps 2 -> 4 kept, 8 dropped.
    layer = _layer(capacity_factor=0.5)
    with torch.no_grad():
        layer.router.weight.zero_()
    layer(torch.randn(1, 6, HIDDEN))
    assert math.isclose(last_stats(layer)["dropped_token_fraction"], 8 / 12)


@pytest.mark.parametrize("reentrant,early_stop", [(False, True), (False, False), (True, True)])
def test_checkpoint_recompute_records_once_and_keeps_aux_grad(reentrant, early_stop):
    # early_stop=False makes the non-reentrant recompute run the whole forward again.
    x = torch.randn(2, 4, HIDDEN)
    plain = _layer(aux_loss_type="switch", aux_loss_coeff=0.5, expert_bias=True)
    plain(x).sum().backward()
    ckpt = _layer(aux_loss_type="switch", aux_loss_coeff=0.5, expert_bias=True)
    x_in = x.clone().requires_grad_(reentrant)   # reentrant checkpoint needs a grad input
    with set_checkpoint_early_stop(early_stop):
        checkpoint(ckpt, x_in, use_reentrant=reentrant).sum().backward()
    assert len(ckpt.step_records) == 1
    finalize_routing_stats([ckpt, plain])
    torch.testing.assert_close(ckpt.bias_counts_e, plain.bias_counts_e)
    torch.testing.assert_close(ckpt.router.weight.grad, plain.router.weight.grad)
    torch.testing.assert_close(ckpt.experts.w_down.grad, plain.experts.w_down.grad)


def test_expert_bias_update_by_hand():
    layer = _layer(expert_bias=True, bias_update_rate=0.1)
    layer.bias_counts_e = torch.tensor([3.0, 1.0, 2.0, 2.0], dtype=torch.float64)   # mean 2
    update_expert_biases([layer])
    torch.testing.assert_close(layer.router.expert_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    assert layer.bias_counts_e is None          # consumed by the update


def test_expert_bias_counts_only_in_training():
    layer = _layer(expert_bias=True)
    with torch.no_grad():
        layer.router.weight.zero_()
    layer(torch.randn(1, 3, HIDDEN))
    finalize_routing_stats(layer)
    assert layer.bias_counts_e.tolist() == [3, 3, 0, 0]
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(1, 3, HIDDEN))
    finalize_routing_stats(layer)
    assert layer.bias_counts_e.tolist() == [3, 3, 0, 0]
    layer.train()
    update_expert_biases(layer)
    # mean 1.5: experts 0, 1 over-loaded (down), 2, 3 under-loaded (up); this flips selection.
    assert layer.router.expert_bias.tolist() == pytest.approx([-1e-3, -1e-3, 1e-3, 1e-3])
    layer(torch.randn(1, 3, HIDDEN))
    assert last_stats(layer)["tokens_per_expert"].tolist() == [0, 0, 3, 3]


def test_model_with_full_recompute_records_each_layer_once():
    cfg = get_preset("tiny-moe")
    model = MoETransformer(cfg)
    init_weights(model, cfg, seed=0)
    model.set_recompute("full")
    set_aux_loss_scale(model, 0.5)
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    model(ids, torch.arange(8).expand(2, 8)).float().logsumexp(-1).mean().backward()
    layers = moe_layers(model)
    assert len(layers) == cfg.num_moe_layers
    assert all(len(layer.step_records) == 1 and layer.aux_loss_scale == 0.5 for layer in layers)
    assert all(layer.router.weight.grad is not None for layer in layers)
    assert set(moe_stats(model)) >= {"aux_loss", "z_loss", "dropped_token_fraction", "load_imbalance"}
