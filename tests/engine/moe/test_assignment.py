"""Capacity and drop policies on a hand-computed example.

4 tokens, 2 experts, k = 1, capacity_factor 1: capacity = ceil(4 * 1 / 2 * 1) = 2.
Tokens 0, 1, 2 pick expert 0 with weights 0.6, 0.9, 0.7; token 3 picks expert 1 (0.8).
"""
import torch

from engine.moe.assignment import build_assignments, expert_capacity

PROBS = torch.tensor([[0.6], [0.9], [0.7], [0.8]])
EXPERTS = torch.tensor([[0], [0], [0], [1]])


def _triples(a):
    """The valid slots (dropped ones sit at the tail, past sum(counts))."""
    n = int(a.counts_e.sum())
    return a.token_n[:n].tolist(), a.expert_n[:n].tolist(), a.prob_n[:n].tolist()


def _num_dropped(a):
    return a.num_routed - int(a.num_kept)


def test_capacity_formula():
    assert expert_capacity(4, 1, 2, 1.0) == 2
    assert expert_capacity(10, 2, 8, 1.25) == 4      # ceil(3.125)
    assert expert_capacity(0, 2, 8, 1.0) == 0


def test_dropless_sorts_by_expert():
    a = build_assignments(PROBS, EXPERTS, 2)
    assert a.token_n.tolist() == [0, 1, 2, 3] and a.expert_n.tolist() == [0, 0, 0, 1]
    assert a.counts_e.tolist() == [3, 1] and _num_dropped(a) == 0 and not a.has_tail


def test_probs_policy_keeps_highest_weights():
    a = build_assignments(PROBS, EXPERTS, 2, capacity_factor=1.0, drop_policy="probs")
    tokens, experts, probs = _triples(a)
    assert (tokens, experts) == ([1, 2, 3], [0, 0, 1])
    torch.testing.assert_close(torch.tensor(probs), torch.tensor([0.9, 0.7, 0.8]))
    assert a.num_routed == 4 and a.num_kept == 3


def test_dropped_slots_sit_at_the_tail_with_a_sentinel_expert_and_no_weight():
    a = build_assignments(PROBS, EXPERTS, 2, capacity_factor=1.0, drop_policy="position")
    assert a.has_tail and a.token_n.numel() == 4         # static shape: T * k slots
    assert (a.token_n[3].item(), a.expert_n[3].item(), a.prob_n[3].item()) == (2, 2, 0.0)


def test_position_policy_keeps_earliest_tokens():
    a = build_assignments(PROBS, EXPERTS, 2, capacity_factor=1.0, drop_policy="position")
    assert _triples(a)[:2] == ([0, 1, 3], [0, 0, 1])


def test_probs_policy_ties_keep_the_earlier_token():
    probs = torch.tensor([[0.5], [0.5], [0.5], [0.8]])
    a = build_assignments(probs, EXPERTS, 2, capacity_factor=1.0, drop_policy="probs")
    assert _triples(a)[:2] == ([0, 1, 3], [0, 0, 1])


def test_pad_to_capacity_fills_with_zero_weight_slots():
    a = build_assignments(PROBS, EXPERTS, 2, capacity_factor=1.0, drop_policy="probs",
                          pad_to_capacity=True)
    tokens, experts, probs = _triples(a)
    # Expert 1 has one real token (3), then a filler (the group's first token, weight 0).
    assert (tokens, experts) == ([1, 2, 3, 0], [0, 0, 1, 1])
    torch.testing.assert_close(torch.tensor(probs), torch.tensor([0.9, 0.7, 0.8, 0.0]))
    assert a.counts_e.tolist() == [2, 2] and a.num_kept == 3
    assert a.num_valid == 4 and a.slots_per_expert == 2 and not a.has_tail


def test_pad_to_capacity_per_group_is_expert_major():
    groups = torch.tensor([0, 0, 1, 1])       # capacity 1 per expert per group
    a = build_assignments(PROBS, EXPERTS, 2, capacity_factor=1.0, drop_policy="position",
                          pad_to_capacity=True, group_ids_t=groups)
    # expert 0: group 0 keeps token 0, group 1 keeps 2; expert 1: filler 0, real 3.
    assert _triples(a)[:2] == ([0, 2, 0, 3], [0, 0, 1, 1])
    assert a.prob_n.tolist()[2] == 0.0 and a.counts_e.tolist() == [2, 2]


def test_capacity_per_group():
    # Groups [0, 0, 1, 1]: 2 tokens each, capacity ceil(2 * 1 / 2) = 1 per expert per group.
    groups = torch.tensor([0, 0, 1, 1])
    a = build_assignments(PROBS, EXPERTS, 2, capacity_factor=1.0, drop_policy="probs", group_ids_t=groups)
    assert _triples(a)[:2] == ([1, 2, 3], [0, 0, 1])
    a = build_assignments(PROBS, EXPERTS, 2, capacity_factor=1.0, drop_policy="position", group_ids_t=groups)
    assert _triples(a)[:2] == ([0, 2, 3], [0, 0, 1])


def test_zero_tokens():
    probs, experts = torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.long)
    for kwargs in ({}, {"capacity_factor": 1.0}, {"capacity_factor": 1.0, "pad_to_capacity": True}):
        a = build_assignments(probs, experts, 4, **kwargs)
        assert a.token_n.numel() == 0 and a.counts_e.tolist() == [0, 0, 0, 0] and _num_dropped(a) == 0


def test_gradient_flows_only_to_kept_weights():
    probs = PROBS.clone().requires_grad_(True)
    a = build_assignments(probs, EXPERTS, 2, capacity_factor=1.0, drop_policy="probs", pad_to_capacity=True)
    a.prob_n.sum().backward()
    assert probs.grad.flatten().tolist() == [0.0, 1.0, 1.0, 1.0]
