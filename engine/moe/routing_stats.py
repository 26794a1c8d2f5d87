"""Routing statistics of one MoE forward as one flat fp64 vector on the model's device.

Contents (all detached), per layer and micro-batch, summed over the stage group
(tp x cp x dp, see aux_loss.py for why these are the layout-invariant statistics):
    counts_e [E]      top-k selections per expert (before dropping)
    prob_sum_e [E]    sum_t p_te of the router distribution
    seq_counts [R, E], seq_probs [R, E]   the same per sequence (sequence aux loss only)
    tokens, routed, kept, lse_sq          T, T k, kept assignments, sum_t logsumexp(z_t)^2
Sequences: R = dp x b rows, one per sequence of the micro-batch on the stage. A rank writes
its b sequences into the rows of its DP index (its stage index // |tp_cp|: stage ranks are
ordered tp fastest, then cp, then dp, engine/parallel/ranks.py) and zeros elsewhere, so
the one SUM over the stage gives every sequence's statistics summed over the tp_cp ranks
that share it (TP-SP and CP split a sequence) - no separate tp_cp reduction.

Reduction: when a loss gradient needs the global statistics (aux or z coefficient > 0)
the SUM is started asynchronously in the forward and waited for in the backward
(aux_loss.attach_aux_loss); otherwise it is deferred and engine.moe.tracking reduces all
layers and micro-batches of a step in one collective. Nothing is read to the host here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .assignment import count_per_key
from .comm import group_rank, group_size
from .router import Routing

NUM_SCALARS = 4   # tokens, routed, kept, lse_sq


@dataclass(frozen=True)
class StatsLayout:
    num_experts: int
    seq_rows: int      # R (0 without the sequence aux loss)

    @property
    def size(self) -> int:
        return 2 * self.num_experts * (1 + self.seq_rows) + NUM_SCALARS

    def view(self, flat: torch.Tensor) -> RoutingStats:
        e, r = self.num_experts, self.seq_rows
        counts, probs, seq_counts, seq_probs, scalars = flat.split([e, e, r * e, r * e, NUM_SCALARS])
        tokens, routed, kept, lse_sq = scalars.unbind(0)
        return RoutingStats(counts, probs, seq_counts.view(r, e), seq_probs.view(r, e),
                            tokens, routed, kept, lse_sq)


@dataclass
class RoutingStats:
    """Views into a flat vector; 0-d tensors for the scalars."""
    counts_e: torch.Tensor
    prob_sum_e: torch.Tensor
    seq_counts_re: torch.Tensor
    seq_probs_re: torch.Tensor
    tokens: torch.Tensor
    routed: torch.Tensor
    kept: torch.Tensor
    lse_sq: torch.Tensor


def seq_slot(stage_group, seq_group) -> tuple[int, int]:
    """(this rank's DP index within the stage, number of DP indices)."""
    per_slot = group_size(seq_group)
    return group_rank(stage_group) // per_slot, group_size(stage_group) // per_slot


def _per_sequence(routing: Routing, batch: int, slot: int, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, num_experts = routing.scores_te.shape
    seq_local = num_tokens // batch if batch else 0
    device = routing.scores_te.device
    counts_re = torch.zeros(num_slots * batch, num_experts, dtype=torch.float64, device=device)
    probs_re = torch.zeros_like(counts_re)
    rows = slice(slot * batch, (slot + 1) * batch)
    experts_bn = routing.experts_tk.reshape(batch, seq_local * routing.experts_tk.shape[1])
    counts_re[rows].scatter_add_(1, experts_bn, torch.ones_like(experts_bn, dtype=torch.float64))
    probs_re[rows] = routing.scores_te.detach().reshape(batch, seq_local, num_experts).sum(1).double()
    return counts_re.flatten(), probs_re.flatten()


def local_routing_stats(routing: Routing, batch: int, num_kept: torch.Tensor, layout: StatsLayout,
                        slot: int = 0, num_slots: int = 1) -> torch.Tensor:
    """This rank's contribution to the flat statistics vector (fp64, on the device)."""
    num_tokens, num_experts = routing.scores_te.shape
    top_k = routing.experts_tk.shape[1]
    device = routing.scores_te.device
    counts_e = count_per_key(routing.experts_tk.reshape(-1), num_experts).double()
    pieces = [counts_e, routing.scores_te.detach().sum(0).double()]
    if layout.seq_rows:
        pieces.extend(_per_sequence(routing, batch, slot, num_slots))
    lse_sq = routing.logits_te.detach().logsumexp(-1).double().pow(2).sum()
    # torch.full, not torch.tensor: no host-to-device copy (which synchronises a CUDA stream).
    shape_scalars = [torch.full((1,), n, dtype=torch.float64, device=device)
                     for n in (num_tokens, num_tokens * top_k)]
    pieces += [*shape_scalars, num_kept.to(torch.float64).view(1), lse_sq.view(1)]
    return torch.cat(pieces)


class PendingStats:
    """A flat statistics vector and the state of its SUM over the stage group."""

    def __init__(self, flat: torch.Tensor, layout: StatsLayout, group, reduce_now: bool):
        self.flat, self.layout, self.group = flat, layout, group
        self.work = None
        self.reduced = group_size(group) == 1
        if reduce_now and not self.reduced:
            self.work = dist.all_reduce(flat, group=group, async_op=True)
            self.reduced = True

    def wait(self) -> RoutingStats:
        """The global statistics (waits for an asynchronous SUM started in the forward)."""
        if not self.reduced:
            raise RuntimeError("routing statistics of this forward are reduced once per step: "
                               "call engine.moe.tracking.finalize_routing_stats first")
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.layout.view(self.flat)


def reduce_deferred(pending: list[PendingStats]) -> None:
    """One SUM per group for every not yet reduced vector (all layers and micro-batches)."""
    by_group: dict[int, list[PendingStats]] = {}
    for p in pending:
        if not p.reduced:
            by_group.setdefault(id(p.group), []).append(p)
    for members in by_group.values():
        flat = torch.cat([p.flat for p in members])
        dist.all_reduce(flat, group=members[0].group)
        for p, part in zip(members, flat.split([p.flat.numel() for p in members])):
            p.flat, p.reduced = part, True
