"""Token -> expert assignments after capacity dropping, in expert-major order.

Capacity (Megatron semantics, computed per *capacity group*):
    capacity = ceil(group_tokens * k / E * capacity_factor)
In a distributed run every rank drops over its own local tokens, so a rank is one capacity
group. The single-process reference reproduces a distributed run exactly when it is given
`group_ids_t` = the rank that owns each token (any attention layout: DP batch shards,
TP-SP or CP sequence shards). Without group ids all local tokens form one group.

Policies: "probs" keeps, per expert, the `capacity` assignments with the highest combine
weight (ties: earlier token); "position" keeps the earliest tokens. `pad_to_capacity`
gives every expert exactly min(capacity, group tokens) slots per group (static shapes):
kept assignments first, then zero-weight fillers (the group's first token, no gradient).

Everything is sorts, scatters and masks on the device with shapes known from T, k, E and
the capacity, so no count is read back to the host (the multi-group reference path
excepted, which sizes its groups on the host). Layout of the N slots:
- dropless: N = T k, sorted by expert, token order inside an expert; all valid;
- dropping: N = T k, the kept ones sorted by (expert, token), then the dropped ones at the
  tail with expert id E (a sentinel that no rank holds) and weight 0;
- pad-to-capacity: N = E * sum over groups of min(capacity, tokens), all valid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Assignments:
    """N (token, expert, weight) slots in expert-major order (layout: module docstring)."""

    token_n: torch.Tensor    # int64 [N], local token row
    expert_n: torch.Tensor   # int64 [N], global expert id, non-decreasing; E = dropped
    prob_n: torch.Tensor     # fp32 [N], combine weight (autograd; 0 for padding and drops)
    counts_e: torch.Tensor   # int64 [E], valid slots per expert (kept + padding)
    num_routed: int          # T * k before dropping (real assignments)
    num_kept: torch.Tensor   # int64 scalar on the device: real assignments kept
    num_valid: int | None    # leading valid slots when known on the host (None: dropping)
    slots_per_expert: int | None = None   # pad-to-capacity: the same count for every expert

    @property
    def has_tail(self) -> bool:
        """Whether slots past sum(counts_e) (dropped assignments) may exist."""
        return self.num_valid is None


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    return math.ceil(num_tokens * top_k / num_experts * capacity_factor)


def count_per_key(key_n: torch.Tensor, num_keys: int) -> torch.Tensor:
    """int64 [num_keys]: occurrences of each key in [0, num_keys]; key num_keys is ignored.
    A scatter-add rather than bincount, which reads its maximum back to the host on CUDA."""
    counts = torch.zeros(num_keys + 1, dtype=torch.long, device=key_n.device)
    return counts.index_add_(0, key_n, torch.ones_like(key_n))[:num_keys]


def _argsort(key_n: torch.Tensor) -> torch.Tensor:
    return torch.sort(key_n, stable=True).indices


def _rank_within_key(sorted_key_n: torch.Tensor, num_keys: int) -> torch.Tensor:
    """For entries sorted by key: 0, 1, 2, ... within each run of equal keys."""
    counts = count_per_key(sorted_key_n, num_keys)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(sorted_key_n.numel(), device=sorted_key_n.device) - starts[sorted_key_n]


def _dropless(probs_tk, experts_tk, num_experts) -> Assignments:
    top_k = experts_tk.shape[1]
    expert_f, prob_f = experts_tk.reshape(-1), probs_tk.reshape(-1)
    order = _argsort(expert_f)     # flat index t*k + j: stable keeps token order per expert
    n = expert_f.numel()
    return Assignments(torch.div(order, top_k, rounding_mode="floor"), expert_f[order], prob_f[order],
                       count_per_key(expert_f, num_experts), n,
                       torch.full((), n, dtype=torch.long, device=expert_f.device), n)


@dataclass
class _Groups:
    """Capacity groups: id of every token, and per group its tokens and capacity."""
    ids_t: torch.Tensor
    tokens_g: torch.Tensor
    capacity_g: torch.Tensor
    host_tokens: list[int] | None    # per group, when known on the host without a read
    host_capacity: list[int] | None


def _groups(num_tokens, top_k, num_experts, capacity_factor, group_ids_t, device) -> _Groups:
    if group_ids_t is None:        # one group: sizes from the shape alone
        cap = expert_capacity(num_tokens, top_k, num_experts, capacity_factor)
        return _Groups(torch.zeros(num_tokens, dtype=torch.long, device=device),
                       torch.full((1,), num_tokens, dtype=torch.long, device=device),
                       torch.full((1,), cap, dtype=torch.long, device=device),
                       [num_tokens], [cap])
    num_groups = int(group_ids_t.max()) + 1 if num_tokens else 1    # reference path: host read
    tokens_g = count_per_key(group_ids_t, num_groups)
    # Same IEEE double operations as expert_capacity: ((n * k) / E) * cf, then ceil.
    capacity_g = (tokens_g.double() * top_k / num_experts * capacity_factor).ceil().long()
    return _Groups(group_ids_t, tokens_g, capacity_g, None, None)


def _priority_order(prob_f, key_f, drop_policy) -> torch.Tensor:
    """Flat indices sorted by capacity key, then by priority inside each key."""
    if drop_policy != "probs":
        return _argsort(key_f)                     # position: flat order = token order
    # Highest weight first; a stable sort keeps earlier tokens first among ties.
    by_prob = torch.sort(prob_f.detach(), descending=True, stable=True).indices
    return by_prob[_argsort(key_f[by_prob])]


def build_assignments(probs_tk: torch.Tensor, experts_tk: torch.Tensor, num_experts: int,
                      capacity_factor: float | None = None, drop_policy: str = "probs",
                      pad_to_capacity: bool = False,
                      group_ids_t: torch.Tensor | None = None) -> Assignments:
    """Flattens the router's top-k choice, applies capacity dropping, sorts by expert."""
    if capacity_factor is None:
        return _dropless(probs_tk, experts_tk, num_experts)
    num_tokens, top_k = experts_tk.shape
    device = experts_tk.device
    groups = _groups(num_tokens, top_k, num_experts, capacity_factor, group_ids_t, device)
    token_f = torch.arange(num_tokens, device=device).repeat_interleave(top_k)
    expert_f, prob_f = experts_tk.reshape(-1), probs_tk.reshape(-1)
    group_f = groups.ids_t[token_f]
    num_groups = groups.tokens_g.numel()
    order = _priority_order(prob_f, group_f * num_experts + expert_f, drop_policy)
    token_s, expert_s, prob_s, group_s = token_f[order], expert_f[order], prob_f[order], group_f[order]
    rank_s = _rank_within_key(group_s * num_experts + expert_s, num_groups * num_experts)
    keep_s = rank_s < groups.capacity_g[group_s]
    prob_s = torch.where(keep_s, prob_s, torch.zeros_like(prob_s))   # no gradient to drops
    num_kept = keep_s.sum()
    if pad_to_capacity:
        return _padded(token_s, expert_s, prob_s, group_s, rank_s, keep_s, groups, num_experts,
                       expert_f.numel(), num_kept)
    # Kept slots by (expert, token), dropped ones behind them (token order: deterministic).
    key_s = torch.where(keep_s, expert_s, num_experts) * max(num_tokens, 1) + token_s
    final = _argsort(key_s)
    expert_n = torch.where(keep_s, expert_s, num_experts)[final]
    return Assignments(token_s[final], expert_n, prob_s[final],
                       count_per_key(expert_n, num_experts), expert_f.numel(), num_kept, None)


def _padded(token_s, expert_s, prob_s, group_s, rank_s, keep_s, groups: _Groups, num_experts,
            num_routed, num_kept) -> Assignments:
    """Slots (expert, group, rank) for r < min(capacity, tokens) of the group; kept
    assignments take ranks 0.., fillers (the group's first token, weight 0) the rest."""
    device = token_s.device
    target_g = torch.minimum(groups.capacity_g, groups.tokens_g)
    if groups.host_tokens is not None:
        host_target = [min(c, t) for c, t in zip(groups.host_capacity, groups.host_tokens)]
    else:
        host_target = target_g.tolist()            # reference path: host read
    per_expert = sum(host_target)
    num_slots = num_experts * per_expert
    group_start_g = torch.cumsum(target_g, 0) - target_g
    # A kept assignment has rank < capacity and < group tokens (one pick per expert per token).
    slot_s = torch.where(keep_s, expert_s * per_expert + group_start_g[group_s] + rank_s, num_slots)
    first_token_g = _first_token_of_group(groups.ids_t, groups.tokens_g.numel())
    slot_group = torch.arange(len(host_target), device=device).repeat_interleave(
        target_g, output_size=per_expert).repeat(num_experts)
    token_n = torch.cat([first_token_g[slot_group], slot_group.new_zeros(1)]).scatter(0, slot_s, token_s)
    prob_n = prob_s.new_zeros(num_slots + 1).scatter(0, slot_s, prob_s)
    expert_n = torch.arange(num_experts, device=device).repeat_interleave(per_expert)
    counts_e = torch.full((num_experts,), per_expert, dtype=torch.long, device=device)
    return Assignments(token_n[:num_slots], expert_n, prob_n[:num_slots], counts_e, num_routed,
                       num_kept, num_slots, per_expert)


def _first_token_of_group(group_ids_t: torch.Tensor, num_groups: int) -> torch.Tensor:
    idx = torch.arange(group_ids_t.numel(), device=group_ids_t.device)
    first = torch.full((num_groups,), max(group_ids_t.numel() - 1, 0), dtype=torch.long, device=idx.device)
    return first.scatter_reduce(0, group_ids_t, idx, reduce="amin")
