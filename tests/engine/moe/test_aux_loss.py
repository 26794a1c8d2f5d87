"""Aux (switch, sequence) and z-loss values by hand, and their injection into backward.

Hand example, E = 2, k = 1, B = 2 sequences of s = 2 tokens:
  seq 0: p = [.75, .25], [.5, .5], both pick expert 0
  seq 1: p = [.2, .8], [.4, .6], pick experts 1 and 0
Switch over the 4 tokens: c = [3, 1], f = c / (T k) = [.75, .25],
  P = [(.75 + .5 + .2 + .4) / 4, 1 - .4625] = [.4625, .5375],
  aux = E sum f P = 2 (.346875 + .134375) = 0.9625.
Sequence-level: seq 0 f = [1, 0], P = [.625, .375] -> 2 * .625 = 1.25;
  seq 1 f = [.5, .5], P = [.3, .7] -> 2 * .5 = 1.0; mean = 1.125.
"""
import math

import torch

from engine.config.model import MoEConfig
from engine.moe.aux_loss import (attach_aux_loss, seq_aux_loss, seq_aux_value, switch_aux_loss,
                                 switch_aux_value, z_loss, z_value)
from engine.moe.layer import MoELayer
from engine.moe.router import Routing
from engine.moe.routing_stats import PendingStats, StatsLayout, local_routing_stats

from .last_stats import last_stats

SCORES = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.2, 0.8], [0.4, 0.6]])
EXPERTS = torch.tensor([[0], [0], [1], [0]])


def _routing(logits=None):
    logits = SCORES.log() if logits is None else logits
    return Routing(logits, SCORES, torch.ones(4, 1), EXPERTS)


def _stats(routing, with_seq):
    layout = StatsLayout(2, 2 if with_seq else 0)
    flat = local_routing_stats(routing, 2, torch.tensor(4), layout)
    return PendingStats(flat, layout, None, reduce_now=True).wait()


def test_switch_aux_value_and_local_term():
    stats = _stats(_routing(), with_seq=False)
    assert math.isclose(float(switch_aux_value(stats, top_k=1)), 0.9625, rel_tol=1e-6)  # fp32 inputs
    # Single process: the local contribution is the whole loss.
    assert math.isclose(float(switch_aux_loss(SCORES, stats, top_k=1)), 0.9625, rel_tol=1e-6)


def test_seq_aux_value_and_local_term():
    stats = _stats(_routing(), with_seq=True)
    assert math.isclose(float(seq_aux_value(stats, top_k=1)), 1.125, rel_tol=1e-6)  # fp32 inputs
    assert math.isclose(float(seq_aux_loss(SCORES, 2, 0, stats, top_k=1)), 1.125, rel_tol=1e-6)


def test_z_loss_value():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0], [0.0, 0.0]])
    stats = _stats(_routing(logits), with_seq=False)
    # lse = ln 2, ln 4, ln 2, ln 2
    expected = (3 * math.log(2.0) ** 2 + math.log(4.0) ** 2) / 4
    assert math.isclose(float(z_value(stats)), expected, rel_tol=1e-6)  # fp32 logits
    assert math.isclose(float(z_loss(logits, stats)), expected, rel_tol=1e-6)


def test_attach_injects_the_gradient_of_the_objective():
    scores = SCORES.clone().requires_grad_(True)
    logits = SCORES.log().requires_grad_(True)
    act = torch.randn(3, requires_grad=True)
    stats = _stats(_routing(), with_seq=False)

    def objective(s, z, st):
        return 0.1 * switch_aux_loss(s, st, 1) + 0.01 * z_loss(z, st)
    layout = StatsLayout(2, 0)
    pending = PendingStats(local_routing_stats(_routing(), 2, torch.tensor(4), layout), layout, None,
                           reduce_now=True)
    attach_aux_loss(act * 2, scores, logits, objective, pending).sum().backward()
    injected = scores.grad.clone(), logits.grad.clone(), act.grad.clone()
    scores.grad = logits.grad = act.grad = None
    ((act * 2).sum() + objective(scores, logits, stats)).backward()
    for got, want in zip(injected, (scores.grad, logits.grad, act.grad)):
        torch.testing.assert_close(got, want)


def _layer(**kw):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, ffn_hidden_size=8, **kw)
    layer = MoELayer(8, cfg)
    with torch.no_grad():
        layer.router.weight.mul_(20)
    return layer


def _router_grad_from_aux_only(layer, x):
    layer.zero_grad()
    (layer(x) * 0).sum().backward()
    return layer.router.weight.grad.clone()


def test_layer_router_grad_matches_independent_switch_formula():
    coeff = 0.1
    layer = _layer(aux_loss_type="switch", aux_loss_coeff=coeff)
    x = torch.randn(2, 5, 8)
    grad = _router_grad_from_aux_only(layer, x)
    # Independent formula: aux = E sum_i f_i P_i with f from one-hot top-k (no grad).
    w = layer.router.weight.detach().clone().requires_grad_(True)
    probs = (x.reshape(-1, 8) @ w.t()).softmax(-1)
    chosen = torch.zeros_like(probs).scatter_(1, probs.topk(2).indices, 1.0)
    f = chosen.sum(0) / (10 * 2)
    (coeff * 4 * (f * probs.mean(0)).sum()).backward()
    torch.testing.assert_close(grad, w.grad, rtol=1e-5, atol=1e-7)
    assert math.isclose(last_stats(layer)["aux_loss"], float(4 * (f * probs.mean(0)).sum().detach()), rel_tol=1e-5)


def test_aux_loss_scale_scales_the_injected_gradient():
    layer = _layer(aux_loss_type="seq", aux_loss_coeff=0.1, z_loss_coeff=0.01)
    x = torch.randn(2, 5, 8)
    full = _router_grad_from_aux_only(layer, x)
    layer.aux_loss_scale = 0.25
    torch.testing.assert_close(_router_grad_from_aux_only(layer, x), full * 0.25)


def test_no_aux_gradient_when_disabled():
    layer = _layer(aux_loss_type="none", z_loss_coeff=0.0)
    grad = _router_grad_from_aux_only(layer, torch.randn(2, 5, 8))
    assert grad.abs().max() == 0


def test_pad_to_capacity_does_not_change_aux_loss():
    # Megatron #1617: padded slots must not count as routed tokens in the seq aux loss.
    x = torch.randn(2, 6, 8)
    values = []
    for pad in (False, True):
        layer = _layer(aux_loss_type="seq", capacity_factor=1.0, pad_to_capacity=pad)
        values.append((_router_grad_from_aux_only(layer, x), last_stats(layer)["aux_loss"]))
    torch.testing.assert_close(values[0][0], values[1][0])
    assert values[0][1] == values[1][1]
