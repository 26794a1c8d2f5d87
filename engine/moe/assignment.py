"""Token -> expert assignments after capacity dropping, sorted by expert.

Capacity (Megatron semantics, computed per *capacity group*):
    capacity = ceil(group_tokens * k / E * capacity_factor)
In a distributed run every rank drops over its own local tokens, so a rank is one capacity
group. The single-process reference reproduces a distributed run exactly when it is given
`group_ids_t` = the rank that owns each token (any attention layout: DP batch shards,
TP-SP or CP sequence shards). Without group ids all local tokens form one group.

Policies: "probs" keeps, per expert, the `capacity` assignments with the highest combine
weight (ties: earlier token); "position" keeps the earliest tokens. `pad_to_capacity`
adds zero-weight filler assignments (the group's first token, weight 0, no gradient) so
that every expert gets exactly `capacity` slots per group (static shapes). If
k * capacity_factor > E the capacity exceeds the group's tokens and padding stops at the
number of tokens the group has.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Assignments:
    """N (token, expert, weight) triples sorted by expert id (stable in token order)."""

    token_n: torch.Tensor    # int64 [N], local token row
    expert_n: torch.Tensor   # int64 [N], global expert id, non-decreasing
    prob_n: torch.Tensor     # fp32 [N], combine weight (autograd; 0 for padding)
    counts_e: torch.Tensor   # int64 [E], assignments per expert
    num_routed: int          # T * k before dropping (real assignments)
    num_kept: int            # real assignments kept (excludes padding)

    @property
    def num_dropped(self) -> int:
        return self.num_routed - self.num_kept


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    return math.ceil(num_tokens * top_k / num_experts * capacity_factor)


def _rank_within_key(key_n: torch.Tensor, num_keys: int) -> torch.Tensor:
    """For entries already sorted by key: 0, 1, 2, ... within each run of equal keys."""
    counts = torch.bincount(key_n, minlength=num_keys)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(key_n.numel(), device=key_n.device) - starts[key_n]


def _sorted_by(key_n: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    order = torch.sort(key_n, stable=True).indices
    return [t[order] for t in tensors]


def _pad_assignments(token_n, expert_n, group_n, group_ids_t, capacities_g, num_experts):
    """Filler (token, expert) pairs that top each (group, expert) up to its capacity."""
    num_groups, device = capacities_g.numel(), token_n.device
    have_ge = torch.bincount(group_n * num_experts + expert_n,
                             minlength=num_groups * num_experts).view(num_groups, num_experts)
    tokens_g = torch.bincount(group_ids_t, minlength=num_groups)
    target_g = torch.minimum(capacities_g, tokens_g)
    missing_ge = (target_g.unsqueeze(1) - have_ge).clamp_min(0)
    first_token_g = _first_token_of_group(group_ids_t, num_groups)
    pair_group = torch.arange(num_groups, device=device).repeat_interleave(num_experts)
    pair_expert = torch.arange(num_experts, device=device).repeat(num_groups)
    reps = missing_ge.flatten()
    return (first_token_g[pair_group].repeat_interleave(reps),
            pair_expert.repeat_interleave(reps))


def _first_token_of_group(group_ids_t: torch.Tensor, num_groups: int) -> torch.Tensor:
    idx = torch.arange(group_ids_t.numel(), device=group_ids_t.device)
    first = torch.full((num_groups,), group_ids_t.numel(), dtype=torch.long, device=idx.device)
    return first.scatter_reduce(0, group_ids_t, idx, reduce="amin")


def build_assignments(probs_tk: torch.Tensor, experts_tk: torch.Tensor, num_experts: int,
                      capacity_factor: float | None = None, drop_policy: str = "probs",
                      pad_to_capacity: bool = False,
                      group_ids_t: torch.Tensor | None = None) -> Assignments:
    """Flattens the router's top-k choice, applies capacity dropping, sorts by expert."""
    num_tokens, top_k = experts_tk.shape
    device = experts_tk.device
    token_n = torch.arange(num_tokens, device=device).repeat_interleave(top_k)
    expert_n = experts_tk.reshape(-1)
    prob_n = probs_tk.reshape(-1)
    num_routed = expert_n.numel()
    if capacity_factor is None:
        token_n, expert_n, prob_n = _sorted_by(expert_n, token_n, expert_n, prob_n)
        return Assignments(token_n, expert_n, prob_n,
                           torch.bincount(expert_n, minlength=num_experts), num_routed, num_routed)

    if group_ids_t is None:
        group_ids_t = torch.zeros(num_tokens, dtype=torch.long, device=device)
    num_groups = int(group_ids_t.max()) + 1 if num_tokens else 1
    tokens_g = torch.bincount(group_ids_t, minlength=num_groups)
    capacities_g = torch.tensor([expert_capacity(int(n), top_k, num_experts, capacity_factor)
                                 for n in tokens_g.tolist()], dtype=torch.long, device=device)
    group_n = group_ids_t[token_n]
    if drop_policy == "probs":
        # Highest weight first; a stable sort keeps earlier tokens first among ties.
        priority = torch.sort(prob_n.detach(), descending=True, stable=True).indices
        token_n, expert_n, prob_n, group_n = (t[priority] for t in (token_n, expert_n, prob_n, group_n))
    key_n = group_n * num_experts + expert_n
    token_n, expert_n, prob_n, group_n, key_n = _sorted_by(key_n, token_n, expert_n, prob_n, group_n, key_n)
    keep = _rank_within_key(key_n, num_groups * num_experts) < capacities_g[group_n]
    token_n, expert_n, prob_n, group_n = token_n[keep], expert_n[keep], prob_n[keep], group_n[keep]
    num_kept = int(keep.sum())
    if pad_to_capacity:
        pad_token, pad_expert = _pad_assignments(token_n, expert_n, group_n, group_ids_t,
                                                 capacities_g, num_experts)
        token_n = torch.cat([token_n, pad_token])
        expert_n = torch.cat([expert_n, pad_expert])
        prob_n = torch.cat([prob_n, prob_n.new_zeros(pad_token.numel())])
    # Back to token order inside each expert (then by expert), for a deterministic layout.
    token_n, expert_n, prob_n = _sorted_by(token_n, token_n, expert_n, prob_n)
    token_n, expert_n, prob_n = _sorted_by(expert_n, token_n, expert_n, prob_n)
    return Assignments(token_n, expert_n, prob_n, torch.bincount(expert_n, minlength=num_experts),
                       num_routed, num_kept)
