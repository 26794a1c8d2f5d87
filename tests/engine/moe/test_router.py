"""Top-k routing on hand-worked logits."""
import math

import torch

from engine.config.model import MoEConfig
from engine.moe.router import TopKRouter, aux_scores, route_topk, stable_topk_indices

LOGITS = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
E = math.e


def test_softmax_over_selected_logits():
    probs, experts = route_topk(LOGITS, 2, "softmax", pre_softmax=False)
    assert experts.tolist() == [[1, 2]]
    # softmax([3, 2]) = [e, 1] / (e + 1)
    torch.testing.assert_close(probs, torch.tensor([[E / (E + 1), 1 / (E + 1)]]))


def test_pre_softmax_with_and_without_renormalisation():
    z = 1 + E ** 2 + E ** 3 + E    # sum of exp(logit - 0) over [1, 3, 2, 0]: e + e^3 + e^2 + 1
    probs, experts = route_topk(LOGITS, 2, "softmax", pre_softmax=True, norm_topk_prob=False)
    assert experts.tolist() == [[1, 2]]
    torch.testing.assert_close(probs, torch.tensor([[E ** 3 / z, E ** 2 / z]]))
    probs, _ = route_topk(LOGITS, 2, "softmax", pre_softmax=True, norm_topk_prob=True)
    torch.testing.assert_close(probs, torch.tensor([[E / (E + 1), 1 / (E + 1)]]))


def test_top1_renormalisation_gives_weight_one_like_hf():
    z = 1 + E ** 2 + E ** 3 + E
    probs, experts = route_topk(LOGITS, 1, "softmax", pre_softmax=True, norm_topk_prob=True)
    assert experts.tolist() == [[1]]
    torch.testing.assert_close(probs, torch.tensor([[1.0]]))   # HF Qwen2-MoE: p / sum(p) = 1
    probs, _ = route_topk(LOGITS, 1, "softmax", pre_softmax=True, norm_topk_prob=False)
    torch.testing.assert_close(probs, torch.tensor([[E ** 3 / z]]))


def test_sigmoid_scores_and_renormalisation():
    ln3 = math.log(3.0)
    logits = torch.tensor([[0.0, ln3, -ln3, -2 * ln3]])     # sigmoid: 0.5, 0.75, 0.25, 0.1
    probs, experts = route_topk(logits, 2, "sigmoid", norm_topk_prob=False)
    assert experts.tolist() == [[1, 0]]
    torch.testing.assert_close(probs, torch.tensor([[0.75, 0.5]]))
    probs, _ = route_topk(logits, 2, "sigmoid", norm_topk_prob=True)
    torch.testing.assert_close(probs, torch.tensor([[0.6, 0.4]]))
    # k = 1 follows the flag literally (as HF does): renormalised it is 1, otherwise sigmoid.
    probs, _ = route_topk(logits, 1, "sigmoid", norm_topk_prob=True)
    torch.testing.assert_close(probs, torch.tensor([[1.0]]))
    probs, _ = route_topk(logits, 1, "sigmoid", norm_topk_prob=False)
    torch.testing.assert_close(probs, torch.tensor([[0.75]]))


def test_ties_go_to_lower_expert_id():
    assert stable_topk_indices(torch.zeros(1, 4), 2).tolist() == [[0, 1]]
    assert stable_topk_indices(torch.tensor([[1.0, 2.0, 2.0, 2.0]]), 2).tolist() == [[1, 2]]
    _, experts = route_topk(torch.zeros(3, 8), 2)
    assert experts.tolist() == [[0, 1]] * 3


def test_expert_bias_changes_selection_not_weights():
    ln3 = math.log(3.0)
    logits = torch.tensor([[0.0, ln3, -ln3, -2 * ln3]])     # sigmoid: 0.5, 0.75, 0.25, 0.1
    bias = torch.tensor([0.0, 0.0, 1.0, 0.0])               # expert 2 selected with 1.25
    probs, experts = route_topk(logits, 2, "sigmoid", norm_topk_prob=False, expert_bias_e=bias)
    assert experts.tolist() == [[2, 1]]
    torch.testing.assert_close(probs, torch.tensor([[0.25, 0.75]]))


def test_aux_scores_are_distributions():
    torch.testing.assert_close(aux_scores(LOGITS, "softmax").sum(-1), torch.ones(1))
    sig = aux_scores(torch.tensor([[0.0, 0.0]]), "sigmoid")
    torch.testing.assert_close(sig, torch.tensor([[0.5, 0.5]]))


def test_router_runs_in_fp32_and_passes_gradient():
    router = TopKRouter(8, MoEConfig(num_experts=4, top_k=2))
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    routing = router(x)
    assert routing.logits_te.dtype == torch.float32 and routing.probs_tk.dtype == torch.float32
    routing.probs_tk[:, 0].sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
