"""Permutation round trips of the dispatchers' building blocks (no communication)."""
import torch

from engine.moe.assignment import build_assignments
from engine.moe.dispatcher_alltoall import inverse_permutation, sort_by_local_expert
from engine.moe.dispatcher_local import LocalDispatcher, combine_tokens, permute_tokens
from engine.moe.experts import grouped_swiglu


class _Identity:
    """Stands in for the experts: returns its input, checks the counts add up."""

    def __call__(self, x_nh, counts):
        assert sum(counts) == x_nh.shape[0]
        return x_nh


def test_sort_by_local_expert_groups_rows_and_inverts():
    # 3 source chunks, 2 local experts; chunk c holds counts[c][e] rows of expert e in order.
    counts = torch.tensor([[2, 1], [0, 0], [1, 3]])
    expert_of_row = torch.tensor([0, 0, 1, 0, 1, 1, 1])
    rows = torch.arange(7)
    perm = sort_by_local_expert(counts)
    assert expert_of_row[perm].tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert rows[perm].tolist() == [0, 1, 3, 2, 4, 5, 6]      # stable within an expert
    assert rows[perm][inverse_permutation(perm)].tolist() == rows.tolist()


def test_sort_by_local_expert_with_no_rows():
    assert sort_by_local_expert(torch.zeros(2, 3, dtype=torch.long)).numel() == 0


def test_permute_combine_round_trip_with_renormalised_weights():
    probs = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.1, 0.9]])
    experts = torch.tensor([[2, 0], [1, 2], [0, 1]])
    a = build_assignments(probs, experts, 3)
    x = torch.randn(3, 4)
    # Weights sum to 1 per token, so permute -> identity experts -> combine returns x.
    torch.testing.assert_close(LocalDispatcher()(x, a, _Identity()), x)
    y = combine_tokens(permute_tokens(x, a.token_n), a.token_n, torch.ones_like(a.prob_n), 3)
    torch.testing.assert_close(y, 2 * x)                      # k = 2 copies summed


def test_grouped_swiglu_matches_per_expert_swiglu_and_handles_empty_experts():
    torch.manual_seed(0)
    w_gate, w_up, w_down = torch.randn(3, 4, 5), torch.randn(3, 4, 5), torch.randn(3, 5, 4)
    x = torch.randn(4, 4)
    counts = [1, 0, 3]
    y = grouped_swiglu(x, counts, w_gate, w_up, w_down)
    expected = torch.cat([
        (torch.nn.functional.silu(x[:1] @ w_gate[0]) * (x[:1] @ w_up[0])) @ w_down[0],
        (torch.nn.functional.silu(x[1:] @ w_gate[2]) * (x[1:] @ w_up[2])) @ w_down[2]])
    torch.testing.assert_close(y, expected)
    assert grouped_swiglu(x[:0], [0, 0, 0], w_gate, w_up, w_down).shape == (0, 4)
