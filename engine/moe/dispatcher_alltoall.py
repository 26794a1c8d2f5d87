"""All-to-all token dispatcher over EP, with optional expert tensor parallelism (ETP).

Rank (etp r_t, ep r_e) holds experts [r_e * E_l, (r_e + 1) * E_l) with F sharded over ETP.
Dispatch (Megatron-Core MoEAlltoAllTokenDispatcher, arXiv 2504.14960):
 1. the assignments are already sorted by global expert = grouped by destination EP rank;
 2. per-expert counts exchanged over EP (all_to_all) and, for ETP > 1, all-gathered over
    ETP, both on the device; then the split sizes of every exchange below are read to the
    host in ONE copy (the only host read of the layer: all_to_all needs host split sizes).
    Pad-to-capacity fixes every count, so it skips both the exchange and the read;
 3. tokens exchanged (variable all_to_all) and, for ETP > 1, all-gathered over ETP (each
    ETP rank received different tokens for the same experts; all must meet every F shard);
 4. received rows sorted by local expert (a permutation built from the counts alone),
    grouped experts run on device counts.
Combine is the reverse: unsort, reduce-scatter (sum of F-shard partial outputs) over
ETP, all_to_all back, weighted sum over the k copies of each token. Dropped slots sit
at the tail of the assignments and are never sent. Every step handles zero rows (a rank
may receive no tokens at all).
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


def sort_by_local_expert(chunk_counts_ce: torch.Tensor, num_rows: int | None = None) -> torch.Tensor:
    """Rows arrive as chunks (one per source), each ordered by local expert with
    chunk_counts_ce[c, e] rows; returns the stable permutation that groups rows by expert.
    `num_rows` (= the sum of the counts, when the host knows it) avoids a device read."""
    num_chunks, num_local = chunk_counts_ce.shape
    if num_rows is None:
        num_rows = int(chunk_counts_ce.sum())
    expert_of_row = torch.arange(num_local, device=chunk_counts_ce.device).repeat(num_chunks)
    expert_of_row = expert_of_row.repeat_interleave(chunk_counts_ce.flatten(), output_size=num_rows)
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

    def _static_counts(self, counts_e: torch.Tensor, per_expert: int):
        """Pad-to-capacity: every rank sends `per_expert` slots to every expert, so all sizes
        follow from the shapes - no count exchange and no host read."""
        ep, etp = group_size(self.ep_group), group_size(self.etp_group)
        num_local = counts_e.numel() // ep
        chunk_counts = counts_e.new_full((etp * ep, num_local), per_expert)
        splits = [num_local * per_expert] * ep
        return chunk_counts, splits, splits, [ep * num_local * per_expert] * etp if etp > 1 else None

    def _exchange_counts(self, counts_e: torch.Tensor):
        """(recv counts [chunks, E_l] on the device, host split sizes: send [ep], recv [ep],
        etp [etp] or None) with a single device-to-host copy."""
        ep, etp = group_size(self.ep_group), group_size(self.etp_group)
        send_counts = counts_e.view(ep, -1)                                       # [ep dst, E_l]
        recv_counts = exchange_counts(send_counts, self.ep_group, self.counter)   # [ep src, E_l]
        sizes = [send_counts.sum(1), recv_counts.sum(1)]
        chunk_counts = recv_counts
        if etp > 1:
            etp_counts = all_gather_counts(recv_counts, self.etp_group, self.counter)  # [etp, ep, E_l]
            sizes.append(etp_counts.sum((1, 2)))
            chunk_counts = etp_counts.reshape(-1, recv_counts.shape[1])
        host = torch.cat(sizes).tolist()
        etp_sizes = host[2 * ep:] if etp > 1 else None
        return chunk_counts, host[:ep], host[ep:2 * ep], etp_sizes

    def forward(self, x_th: torch.Tensor, assign: Assignments, experts: GroupedExperts) -> torch.Tensor:
        if assign.slots_per_expert is not None:
            counts = self._static_counts(assign.counts_e, assign.slots_per_expert)
        else:
            counts = self._exchange_counts(assign.counts_e)
        chunk_counts, send_splits, recv_splits, etp_sizes = counts
        num_sent = sum(send_splits)               # the valid slots; dropped ones stay here
        token_n, prob_n = assign.token_n[:num_sent], assign.prob_n[:num_sent]

        x_rh = all_to_all_v(permute_tokens(x_th, token_n), send_splits, recv_splits,
                            self.ep_group, self.counter)
        if etp_sizes is not None:
            x_rh = all_gather_v(x_rh, etp_sizes, self.etp_group, self.counter)

        perm = sort_by_local_expert(chunk_counts, x_rh.shape[0])
        x_sorted = x_rh.index_select(0, perm)
        # Neither the received rows nor the experts' output in expert order are kept by
        # autograd (index_select keeps only perm): no name holds them past their last use,
        # so the layer's peak (at the ETP reduce-scatter) has two [rows, h] fewer.
        del x_rh
        y_rh = experts(x_sorted, chunk_counts.sum(0)).index_select(0, inverse_permutation(perm))
        del x_sorted

        if etp_sizes is not None:
            y_rh = reduce_scatter_v(y_rh, etp_sizes, self.etp_group, self.counter)
        y_nh = all_to_all_v(y_rh, recv_splits, send_splits, self.ep_group, self.counter)
        return combine_tokens(y_nh, token_n, prob_n, x_th.shape[0])
