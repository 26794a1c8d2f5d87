"""All-gather token dispatcher over the ETP x EP group (Megatron-Core
MoEAllGatherTokenDispatcher semantics), with no host read.

Every rank of the dispatcher group gathers all tokens of the group and their
(token, expert, weight) slots, runs its local experts (its EP block, its ETP slice of F)
on the slots that target them, scatters the weighted outputs into a [all tokens, h]
buffer and reduce-scatters (sum) it back: each token then holds the sum over its k
experts and over the F shards. Cheaper than all-to-all for small EP or when most tokens
are local; traffic grows with the group size.

Static shapes: every rank of the group holds the same number of tokens (micro-batches are
equal and SP/CP shards are equal), hence the same number of slots, so every size is known
on the host from the shapes. The local slots are found by one stable sort on the device;
the permuted buffer keeps a row for every gathered slot and the grouped GEMM computes only
the leading rows of local experts (pad-to-capacity: exactly those rows, a static count).
"""
from __future__ import annotations

import torch
from torch import nn

from engine.parallel.traffic import Link

from .assignment import Assignments, count_per_key
from .comm import CommCounter, all_gather_v, group_rank, group_size, reduce_scatter_v
from .dispatcher_local import combine_tokens, permute_tokens
from .experts import GroupedExperts


class AllGatherDispatcher(nn.Module):
    def __init__(self, num_experts: int, dispatch_group, ep_group, link: Link | None = None):
        super().__init__()
        self.num_experts = num_experts
        self.dispatch_group, self.ep_group = dispatch_group, ep_group
        self.counter = CommCounter(link)

    def _local_expert_range(self) -> tuple[int, int]:
        num_local = self.num_experts // group_size(self.ep_group)
        first = group_rank(self.ep_group) * num_local
        return first, first + num_local

    def _gather_slots(self, assign: Assignments, num_tokens: int):
        """Every rank's slots: (token row in the gathered tokens, global expert, weight)."""
        group, counter, n = self.dispatch_group, self.counter, group_size(self.dispatch_group)
        num_slots = assign.token_n.numel()
        ids_n2 = all_gather_v(torch.stack([assign.token_n, assign.expert_n], 1), [num_slots] * n,
                              group, counter)
        prob_all = all_gather_v(assign.prob_n, [num_slots] * n, group, counter)
        owner_offset = torch.arange(n, device=ids_n2.device).repeat_interleave(num_slots) * num_tokens
        return ids_n2[:, 0] + owner_offset, ids_n2[:, 1], prob_all

    def forward(self, x_th: torch.Tensor, assign: Assignments, experts: GroupedExperts) -> torch.Tensor:
        group, counter, n = self.dispatch_group, self.counter, group_size(self.dispatch_group)
        num_tokens = x_th.shape[0]
        x_all = all_gather_v(x_th, [num_tokens] * n, group, counter)                # [n T, h]
        token_all, expert_all, prob_all = self._gather_slots(assign, num_tokens)

        first, last = self._local_expert_range()
        num_local = last - first
        local_expert = expert_all - first
        mine = (local_expert >= 0) & (local_expert < num_local)
        key = torch.where(mine, local_expert, num_local)      # other ranks' slots sort last
        order = torch.sort(key, stable=True).indices
        counts = count_per_key(key, num_local)
        has_tail = assign.slots_per_expert is None
        if not has_tail:                                      # pad-to-capacity: static count
            order = order[:n * num_local * assign.slots_per_expert]
        rows = token_all[order]
        x_nh = permute_tokens(x_all, rows)
        del x_all     # not kept by autograd (the gather keeps only rows): free it before the experts
        y_nh = experts(x_nh, counts, has_tail=has_tail)
        y_all = combine_tokens(y_nh, rows, prob_all[order], n * num_tokens)
        return reduce_scatter_v(y_all, [num_tokens] * n, group, counter)
