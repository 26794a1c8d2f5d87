"""Permutation round trips of the dispatchers' building blocks (no communication)."""
import pytest
import torch

from engine.moe.assignment import build_assignments
from engine.moe.dispatcher_alltoall import inverse_permutation, sort_by_local_expert
from engine.moe.dispatcher_local import LocalDispatcher, combine_tokens, permute_tokens
from engine.testing.saved import saved_tensors


class _Identity:
    """Stands in for the experts: returns its input (zeros past the counts), checks sizes."""

    def __call__(self, x_nh, counts_e, has_tail=False):
        valid = int(counts_e.sum())
        assert valid == x_nh.shape[0] or (has_tail and valid < x_nh.shape[0])
        return torch.cat([x_nh[:valid], torch.zeros_like(x_nh[valid:])])


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


def test_dropped_tail_contributes_nothing():
    # 3 tokens all pick expert 0 (k=1), capacity ceil(3/2 * 1) = 2: token 2 is dropped.
    probs, experts = torch.ones(3, 1), torch.zeros(3, 1, dtype=torch.long)
    a = build_assignments(probs, experts, 2, capacity_factor=1.0, drop_policy="position")
    x = torch.randn(3, 4)
    y = LocalDispatcher()(x, a, _Identity())
    torch.testing.assert_close(y, torch.cat([x[:2], torch.zeros(1, 4)]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_keeps_expert_rows_in_their_dtype_with_autograds_gradients(dtype):
    """The weighted sum runs in fp32 but backward keeps y as it came (2 bytes an element in
    bf16, not an fp32 copy); outputs and gradients equal autograd's fp32 composition bit for bit."""
    gen = torch.Generator().manual_seed(0)
    tokens, k, hidden = 13, 3, 8
    token_n = torch.arange(tokens).repeat_interleave(k)[torch.randperm(tokens * k, generator=gen)]
    y = torch.randn(tokens * k, hidden, generator=gen).to(dtype).requires_grad_(True)
    prob = torch.rand(tokens * k, generator=gen).requires_grad_(True)
    grad_out = torch.randn(tokens, hidden, generator=gen).to(dtype)

    def composed():
        weighted = y.float() * prob.float().unsqueeze(-1)
        return weighted.new_zeros(tokens, hidden).index_add(0, token_n, weighted).to(dtype)
    out, kept = saved_tensors(lambda: combine_tokens(y, token_n, prob, tokens))
    assert [t.dtype for t in kept.values() if t.shape == y.shape] == [dtype]
    want_out = composed()
    got = torch.autograd.grad(out, (y, prob), grad_out)
    want = torch.autograd.grad(want_out, (y, prob), grad_out)
    assert torch.equal(out, want_out) and all(torch.equal(a, b) for a, b in zip(got, want))
