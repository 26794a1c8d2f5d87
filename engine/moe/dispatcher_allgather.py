"""All-gather token dispatcher over the ETP x EP group (Megatron-Core
MoEAllGatherTokenDispatcher semantics).

Every rank of the dispatcher group gathers all tokens of the group and their
(token, expert, weight) assignments, runs its local experts (its EP block, its ETP slice
of F) on the assignments that target them, scatters the weighted outputs into a
[all tokens, h] buffer and reduce-scatters (sum) it back: each token then holds the sum
over its k experts and over the F shards. Cheaper than all-to-all for small EP or when
most tokens are local; traffic grows with the group size.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.parallel.traffic import Link

from .assignment import Assignments
from .comm import CommCounter, all_gather_counts, all_gather_v, group_rank, group_size, reduce_scatter_v
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

    def forward(self, x_th: torch.Tensor, assign: Assignments, experts: GroupedExperts) -> torch.Tensor:
        group, counter = self.dispatch_group, self.counter
        local_sizes = torch.tensor([x_th.shape[0], assign.token_n.numel()], device=x_th.device)
        sizes = all_gather_counts(local_sizes, group, counter)           # [n, (tokens, assignments)]
        token_sizes, assign_sizes = sizes[:, 0].tolist(), sizes[:, 1].tolist()

        x_all = all_gather_v(x_th, token_sizes, group, counter)                      # [T_all, h]
        token_offsets = torch.cumsum(sizes[:, 0], 0) - sizes[:, 0]
        owner_n = torch.arange(len(assign_sizes), device=x_th.device).repeat_interleave(sizes[:, 1])
        token_all = all_gather_v(assign.token_n, assign_sizes, group, counter) + token_offsets[owner_n]
        expert_all = all_gather_v(assign.expert_n, assign_sizes, group, counter)
        prob_all = all_gather_v(assign.prob_n, assign_sizes, group, counter)

        first, last = self._local_expert_range()
        mine = torch.nonzero((expert_all >= first) & (expert_all < last)).squeeze(1)
        local_expert = expert_all[mine] - first
        order = mine[torch.sort(local_expert, stable=True).indices]
        counts = torch.bincount(expert_all[order] - first, minlength=last - first).tolist()
        y_nh = experts(permute_tokens(x_all, token_all[order]), counts)
        y_all = combine_tokens(y_nh, token_all[order], prob_all[order], x_all.shape[0])
        return reduce_scatter_v(y_all, token_sizes, group, counter)
