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
  tokens, which TP-SP and CP split across the "tp_cp" ranks), averaged over the R
  sequences of the micro-batch on the stage (per-sequence rows: routing_stats.py).
- z-loss (ST-MoE, arXiv 2202.08906): mean_t logsumexp(z_t)^2 = sum_{local} lse^2 / T.
The weighted sum coeff * loss * aux_loss_scale enters backward through `attach_aux_loss`,
which returns the activation unchanged; its backward waits for the statistics (reduced
asynchronously since the forward), differentiates the local objective with respect to the
router scores and logits, and adds that to their gradients, so the caller never adds it to
its loss (pipeline stages get it without plumbing) and the forward never blocks on the
reduction. The trainer sets aux_loss_scale = 1/num_microbatches. Logged values are the
global ones, as 0-d device tensors (read once per step by the trainer).
"""
from __future__ import annotations

from typing import Callable

import torch

from engine.config.model import MoEConfig

from .routing_stats import PendingStats, RoutingStats

Objective = Callable[[torch.Tensor, torch.Tensor, RoutingStats], torch.Tensor]


def _clamp1(x: torch.Tensor) -> torch.Tensor:
    return x.clamp_min(1.0)


def switch_aux_loss(scores_te: torch.Tensor, stats: RoutingStats, top_k: int) -> torch.Tensor:
    """This rank's differentiable contribution to E sum_i f_i P_i."""
    num_experts = scores_te.shape[-1]
    tokens = _clamp1(stats.tokens)
    f_e = (stats.counts_e / (tokens * top_k)).to(scores_te.dtype)
    return num_experts * (f_e * scores_te.sum(0)).sum() / tokens.to(scores_te.dtype)


def switch_aux_value(stats: RoutingStats, top_k: int) -> torch.Tensor:
    tokens = _clamp1(stats.tokens)
    return stats.counts_e.numel() * (stats.counts_e * stats.prob_sum_e).sum() / (tokens * tokens * top_k)


def _seq_len_and_count(stats: RoutingStats) -> tuple[torch.Tensor, int]:
    num_seqs = max(stats.seq_counts_re.shape[0], 1)
    return _clamp1(stats.tokens / num_seqs), num_seqs


def seq_aux_loss(scores_te: torch.Tensor, batch: int, slot: int, stats: RoutingStats,
                 top_k: int) -> torch.Tensor:
    """This rank's contribution to the mean over sequences of their switch loss; its b
    sequences are rows [slot*b, (slot+1)*b) of the per-sequence statistics."""
    num_tokens, num_experts = scores_te.shape
    seq_len, num_seqs = _seq_len_and_count(stats)
    mine_be = stats.seq_counts_re[slot * batch:(slot + 1) * batch]
    f_be = (mine_be / (seq_len * top_k)).to(scores_te.dtype)
    local_prob_be = scores_te.reshape(batch, num_tokens // max(batch, 1), num_experts).sum(1)
    return num_experts * (f_be * local_prob_be).sum() / (seq_len * num_seqs).to(scores_te.dtype)


def seq_aux_value(stats: RoutingStats, top_k: int) -> torch.Tensor:
    seq_len, num_seqs = _seq_len_and_count(stats)
    num_experts = stats.counts_e.numel()
    per_seq = (stats.seq_counts_re * stats.seq_probs_re).sum()
    return num_experts * per_seq / (seq_len * seq_len * top_k) / num_seqs


def z_loss(logits_te: torch.Tensor, stats: RoutingStats) -> torch.Tensor:
    return logits_te.logsumexp(-1).pow(2).sum() / _clamp1(stats.tokens).to(logits_te.dtype)


def z_value(stats: RoutingStats) -> torch.Tensor:
    return stats.lse_sq / _clamp1(stats.tokens)


def routing_values(stats: RoutingStats, cfg: MoEConfig) -> dict[str, torch.Tensor]:
    """The logged values of one forward's global statistics, as device tensors (without
    coefficients): aux_loss (0 when disabled), z_loss, routed, kept, tokens_per_expert."""
    if cfg.aux_loss_type == "switch":
        aux = switch_aux_value(stats, cfg.top_k)
    elif cfg.aux_loss_type == "seq":
        aux = seq_aux_value(stats, cfg.top_k)
    else:
        aux = stats.tokens.new_zeros(())
    dropped = torch.where(stats.routed > 0, 1.0 - stats.kept / stats.routed.clamp_min(1.0), 0.0)
    return {"aux_loss": aux, "z_loss": z_value(stats), "num_tokens": stats.tokens,
            "routed": stats.routed, "kept": stats.kept, "dropped_token_fraction": dropped,
            "tokens_per_expert": stats.counts_e}


class _InjectAuxGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, activation, scores_te, logits_te, objective: Objective, pending: PendingStats):
        ctx.save_for_backward(scores_te, logits_te)
        ctx.objective, ctx.pending = objective, pending
        return activation

    @staticmethod
    def backward(ctx, grad):
        scores_te, logits_te = ctx.saved_tensors
        stats = ctx.pending.wait()
        with torch.enable_grad():
            scores = scores_te.detach().requires_grad_(True)
            logits = logits_te.detach().requires_grad_(True)
            loss = ctx.objective(scores, logits, stats)
            d_scores, d_logits = torch.autograd.grad(loss, (scores, logits), allow_unused=True)
        return grad, d_scores, d_logits, None, None


def attach_aux_loss(activation: torch.Tensor, scores_te: torch.Tensor, logits_te: torch.Tensor,
                    objective: Objective, pending: PendingStats) -> torch.Tensor:
    """`activation`, with d objective(scores, logits, global stats) / d(scores, logits)
    added to the backward pass."""
    if not (torch.is_grad_enabled() and (scores_te.requires_grad or logits_te.requires_grad)):
        return activation
    return _InjectAuxGrad.apply(activation, scores_te, logits_te, objective, pending)
