"""Top-k router: fp32 scores, deterministic top-k, combine weights.

Selection and combine weights are separate on purpose: the aux-loss-free expert bias
(DeepSeek-V3, arXiv 2412.19437 sec. 2.1.2) shifts which experts are *selected* but never
the weights the expert outputs are mixed with.

Score functions (E experts, logits z_t = W x_t in fp32):
- softmax, pre_softmax=False (Mixtral): select top-k of z (+bias), weights = softmax over
  the k selected logits (already normalised; `norm_topk_prob` changes nothing).
- softmax, pre_softmax=True (Qwen2-MoE, DeepSeekMoE): p = softmax(z) over all E, select
  top-k of p (+bias), weights = p of the selected, renormalised if `norm_topk_prob`.
- sigmoid (DeepSeek-V3): p = sigmoid(z), select top-k of p (+bias), weights = p of the
  selected, renormalised if `norm_topk_prob`.
`norm_topk_prob` is honoured at k = 1 too, as Hugging Face's Qwen2-MoE/Qwen3-MoE do: every
weight is then 1 and the router learns from the auxiliary losses only; an imported model
must compute what it computed in HF.
Ties are broken towards the lower expert id (stable sort), so every rank and every
recomputation selects the same experts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.config.model import MoEConfig


@dataclass
class Routing:
    """Router output for T local tokens."""

    logits_te: torch.Tensor     # fp32 [T, E], for the z-loss
    scores_te: torch.Tensor     # fp32 [T, E], distribution over experts for the aux loss
    probs_tk: torch.Tensor      # fp32 [T, k], combine weights (carry the router grad)
    experts_tk: torch.Tensor    # int64 [T, k], selected global expert ids


def stable_topk_indices(scores_te: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores per row; ties go to the lower index."""
    return torch.sort(scores_te, dim=-1, descending=True, stable=True).indices[..., :k]


def aux_scores(logits_te: torch.Tensor, score_func: str) -> torch.Tensor:
    """The per-token distribution P used by load-balancing losses (sums to 1 per token)."""
    if score_func == "softmax":
        return logits_te.softmax(dim=-1)
    sig = logits_te.sigmoid()
    return sig / sig.sum(dim=-1, keepdim=True)


def route_topk(logits_te: torch.Tensor, top_k: int, score_func: str = "softmax",
               pre_softmax: bool = False, norm_topk_prob: bool = True,
               expert_bias_e: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(combine weights [T, k], expert ids [T, k]) from fp32 logits."""
    if score_func == "softmax":
        probs_te = logits_te.softmax(dim=-1)
        select_te = probs_te if pre_softmax else logits_te
    else:
        probs_te = logits_te.sigmoid()
        select_te = probs_te
    if expert_bias_e is not None:
        select_te = select_te + expert_bias_e
    experts_tk = stable_topk_indices(select_te.detach(), top_k)
    if score_func == "softmax" and not pre_softmax:
        return logits_te.gather(-1, experts_tk).softmax(dim=-1), experts_tk
    weights_tk = probs_te.gather(-1, experts_tk)
    if norm_topk_prob:
        weights_tk = weights_tk / weights_tk.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return weights_tk, experts_tk


class TopKRouter(nn.Module):
    """Linear gate [E, h] run in fp32, plus the optional selection-only expert bias."""

    def __init__(self, hidden_size: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, hidden_size))
        if not self.weight.is_meta:   # meta (shard-size build): engine.models.init fills it
            nn.init.normal_(self.weight, std=0.02)
        if cfg.expert_bias:
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def forward(self, x_th: torch.Tensor) -> Routing:
        logits_te = F.linear(x_th.float(), self.weight.float())
        probs_tk, experts_tk = route_topk(
            logits_te, self.cfg.top_k, self.cfg.score_func, self.cfg.pre_softmax,
            self.cfg.norm_topk_prob, self.expert_bias)
        return Routing(logits_te, aux_scores(logits_te, self.cfg.score_func), probs_tk, experts_tk)
