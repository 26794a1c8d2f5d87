"""All-to-all token dispatcher over EP, with optional expert tensor parallelism (ETP).

Rank (etp r_t, ep r_e) holds experts [r_e * E_l, (r_e + 1) * E_l) with F sharded over ETP.
Dispatch (Megatron-Core MoEAlltoAllTokenDispatcher, arXiv 2504.14960):
 1. tokens permuted by global expert = grouped by destination EP rank;
 2. per-expert counts exchanged (all_to_all), tokens exchanged (variable all_to_all);
 3. ETP > 1: tokens all-gathered over ETP (each ETP rank received different tokens for
    the same experts; all of them must meet every F shard);
 4. received rows sorted by local expert, grouped experts run.
Combine is the reverse: unsort, reduce-scatter (sum of F-shard partial outputs) over
ETP, all_to_all back, weighted sum over the k copies of each token.
Every step handles zero rows (a rank may receive no tokens at all).
"""
from __future__ import annotations

import torch
from torch import nn

from engine.parallel.traffic import Link

from .assignment import Assignments
from .comm import (CommCounter, all_gather_counts, all_gather_v, all_to_all_v, exchange_counts,
                   group_size, reduce_scatter_v)
from .dispatcher_local import combine_tokens, permute_tokens
from .experts import GroupedExperts


def sort_by_local_expert(chunk_counts_ce: torch.Tensor) -> torch.Tensor:
    """Rows arrive as chunks (one per source), each ordered by local expert with
    chunk_counts_ce[c, e] rows; returns the stable permutation that groups rows by expert."""
    num_chunks, num_local = chunk_counts_ce.shape
    expert_of_row = torch.arange(num_local, device=chunk_counts_ce.device).repeat(num_chunks).repeat_interleave(chunk_counts_ce.flatten())
    return torch.sort(expert_of_row, stable=True).indices


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


class AllToAllDispatcher(nn.Module):
    def __init__(self, num_experts: int, ep_group, etp_group=None, link: Link | None = None):
        super().__init__()
        self.num_experts = num_experts
        self.ep_group, self.etp_group = ep_group, etp_group
        self.counter = CommCounter(link)

    def forward(self, x_th: torch.Tensor, assign: Assignments, experts: GroupedExperts) -> torch.Tensor:
        ep, etp = group_size(self.ep_group), group_size(self.etp_group)
        num_local = self.num_experts // ep
        send_counts = assign.counts_e.view(ep, num_local)                 # [ep dst, E_l]
        recv_counts = exchange_counts(send_counts, self.ep_group, self.counter)  # [ep src, E_l]
        send_splits, recv_splits = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()

        x_nh = permute_tokens(x_th, assign.token_n)
        x_rh = all_to_all_v(x_nh, send_splits, recv_splits, self.ep_group, self.counter)
        chunk_counts, etp_sizes = recv_counts, None
        if etp > 1:
            etp_counts = all_gather_counts(recv_counts, self.etp_group, self.counter)  # [etp, ep, E_l]
            etp_sizes = etp_counts.sum((1, 2)).tolist()
            x_rh = all_gather_v(x_rh, etp_sizes, self.etp_group, self.counter)
            chunk_counts = etp_counts.reshape(-1, num_local)

        perm = sort_by_local_expert(chunk_counts)
        y_sorted = experts(x_rh.index_select(0, perm), chunk_counts.sum(0).tolist())
        y_rh = y_sorted.index_select(0, inverse_permutation(perm))

        if etp > 1:
            y_rh = reduce_scatter_v(y_rh, etp_sizes, self.etp_group, self.counter)
        y_nh = all_to_all_v(y_rh, recv_splits, send_splits, self.ep_group, self.counter)
        return combine_tokens(y_nh, assign.token_n, assign.prob_n, x_th.shape[0])
