"""Load-balancing and z losses whose value and gradient do not depend on the layout.

Semantics (the statistics of one *micro-batch* of one pipeline stage; the bug class of
Megatron issue #3672, PR #3768 and PR #5047 is a loss that changes with TP/CP/DP):
- T = tokens of the micro-batch over the whole stage group (mesh axis "stage" =
  tp x cp x dp), c_i = top-k selections of expert i over those tokens (before dropping),
  f_i = c_i / (T k), P_i = (1/T) sum_t p_ti with p the router distribution
  (softmax, or sigmoid normalised per token).
- Switch (arXiv 2101.03961): aux = E sum_i f_i P_i (= 1 for perfect balance).
  Each rank computes E sum_i f_i * (sum_{local t} p_ti) / T with f_i from the all-reduced,
  detached counts: summed over the ranks this is exactly aux, and so are the gradients,
  since every gradient reduction is a SUM.
- Sequence-level (DeepSeek-V2/V3): the switch loss of each sequence (f, P over its s
  tokens, which TP-SP and CP split across the "tp_cp" ranks, so its counts are
  all-reduced there), averaged over the B sequences of the micro-batch on the stage.
- z-loss (ST-MoE, arXiv 2202.08906): mean_t logsumexp(z_t)^2 = sum_{local} lse^2 / T.
The weighted sum coeff * loss * aux_loss_scale enters backward through `attach_aux_loss`,
which returns the activation unchanged and injects d(weighted)/d(.) = 1 in backward, so
the caller never adds it to its loss (pipeline stages get it without plumbing). The
trainer sets aux_loss_scale = 1/num_microbatches. Logged values are the global ones,
detached. Without groups (single process) all statistics are local.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .comm import all_reduce_sum_, group_size
from .router import Routing


class _InjectLossGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, activation, loss):
        ctx.loss_dtype = loss.dtype
        return activation

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones((), dtype=ctx.loss_dtype, device=grad.device)


def attach_aux_loss(activation: torch.Tensor, weighted_loss: torch.Tensor) -> torch.Tensor:
    """`activation`, with d(weighted_loss)/d(.) added to the backward pass."""
    if not (weighted_loss.requires_grad and torch.is_grad_enabled()):
        return activation
    return _InjectLossGrad.apply(activation, weighted_loss.float())


@dataclass
class GlobalRoutingStats:
    """Detached micro-batch statistics summed over the stage (and per sequence over tp_cp)."""

    counts_e: torch.Tensor         # fp64 [E], top-k selections per expert
    prob_sum_e: torch.Tensor       # fp64 [E], sum_t p_te
    num_tokens: float              # T over the stage
    num_routed: float              # T k
    num_kept: float                # after capacity dropping
    lse_sq_sum: float              # sum_t logsumexp(z_t)^2
    num_seqs: float                # B over the stage
    seq_value_sum: float           # sum over the B sequences of their switch loss
    seq_counts_be: torch.Tensor | None = None    # fp64 [b, E], per local sequence
    seq_prob_sum_be: torch.Tensor | None = None  # fp64 [b, E]
    seq_tokens: float = 0.0                      # s per sequence (over tp_cp)


def _seq_sums(routing: Routing, batch: int, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    experts_bn = routing.experts_tk.reshape(batch, -1)
    counts_be = torch.zeros(batch, num_experts, dtype=torch.float64, device=experts_bn.device)
    counts_be.scatter_add_(1, experts_bn, torch.ones_like(experts_bn, dtype=torch.float64))
    prob_be = routing.scores_te.detach().reshape(batch, -1, num_experts).sum(1).double()
    return counts_be, prob_be


def _collect_seq_stats(routing: Routing, batch: int, seq_group) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-sequence counts/prob sums of this rank's b sequences, summed over tp_cp."""
    num_tokens, num_experts = routing.scores_te.shape
    seq_counts, seq_probs = _seq_sums(routing, batch, num_experts)
    seq_len = torch.tensor([num_tokens // max(batch, 1)], dtype=torch.float64, device=seq_counts.device)
    flat = torch.cat([seq_counts.flatten(), seq_probs.flatten(), seq_len])
    all_reduce_sum_(flat, seq_group)
    n = batch * num_experts
    return flat[:n].view(batch, num_experts), flat[n:2 * n].view(batch, num_experts), float(flat[-1])


def _seq_value_sum(counts_be: torch.Tensor, prob_be: torch.Tensor, seq_len: float, top_k: int) -> float:
    """sum over sequences of E sum_i f_bi P_bi."""
    seq_len = max(seq_len, 1.0)
    return counts_be.shape[-1] * float((counts_be * prob_be).sum()) / (seq_len * seq_len * top_k)


def collect_routing_stats(routing: Routing, batch: int, num_kept: int, *, with_seq: bool,
                          stage_group=None, seq_group=None) -> GlobalRoutingStats:
    """One all-reduce over the stage group (after one over tp_cp for the sequence loss)."""
    num_tokens, num_experts = routing.scores_te.shape
    top_k = routing.experts_tk.shape[1]
    seq_stats, seq_value = None, 0.0
    if with_seq:
        seq_stats = _collect_seq_stats(routing, batch, seq_group)
        # Every tp_cp rank holds the same sequences: count each once in the stage sum.
        seq_value = _seq_value_sum(*seq_stats, top_k) / group_size(seq_group)
    counts_e = torch.bincount(routing.experts_tk.reshape(-1), minlength=num_experts).double()
    lse_sq = routing.logits_te.detach().logsumexp(-1).double().pow(2).sum()
    scalars = torch.tensor([num_tokens, num_tokens * top_k, num_kept, batch, seq_value],
                           dtype=torch.float64, device=counts_e.device)
    flat = torch.cat([counts_e, routing.scores_te.detach().sum(0).double(), scalars, lse_sq.view(1)])
    all_reduce_sum_(flat, stage_group)
    counts_e, prob_sum_e, rest = flat.split([num_experts, num_experts, 6])
    tokens, routed, kept, seqs, seq_value_sum, lse_sq_sum = rest.tolist()
    stats = GlobalRoutingStats(counts_e, prob_sum_e, tokens, routed, kept, lse_sq_sum,
                               seqs / group_size(seq_group), seq_value_sum)
    if seq_stats is not None:
        stats.seq_counts_be, stats.seq_prob_sum_be, stats.seq_tokens = seq_stats
    return stats


def switch_aux_loss(scores_te: torch.Tensor, stats: GlobalRoutingStats, top_k: int) -> tuple[torch.Tensor, float]:
    """(this rank's differentiable contribution, global value)."""
    num_experts = scores_te.shape[-1]
    tokens = max(stats.num_tokens, 1.0)
    f_e = (stats.counts_e / (tokens * top_k)).to(scores_te.dtype)
    local = num_experts * (f_e * scores_te.sum(0)).sum() / tokens
    value = num_experts * float((stats.counts_e * stats.prob_sum_e).sum()) / (tokens * tokens * top_k)
    return local, value


def seq_aux_loss(scores_te: torch.Tensor, batch: int, stats: GlobalRoutingStats,
                 top_k: int) -> tuple[torch.Tensor, float]:
    """(this rank's differentiable contribution, global value), mean over sequences."""
    num_experts = scores_te.shape[-1]
    seq_len, num_seqs = max(stats.seq_tokens, 1.0), max(stats.num_seqs, 1.0)
    f_be = (stats.seq_counts_be / (seq_len * top_k)).to(scores_te.dtype)
    local_prob_be = scores_te.reshape(batch, -1, num_experts).sum(1)
    local = num_experts * (f_be * local_prob_be).sum() / (seq_len * num_seqs)
    return local, stats.seq_value_sum / num_seqs


def z_loss(logits_te: torch.Tensor, stats: GlobalRoutingStats) -> tuple[torch.Tensor, float]:
    tokens = max(stats.num_tokens, 1.0)
    return logits_te.logsumexp(-1).pow(2).sum() / tokens, stats.lse_sq_sum / tokens
