"""Pure pieces of ring attention: the causal step plan and the stable LSE merge."""
import itertools

import pytest
import torch

from engine.attention import block_forward
from engine.context_parallel import merge_partials, step_plan, zigzag_indices

TOL = dict(rtol=1e-5, atol=1e-6)  # fp32 merge vs one-shot softmax: rounding only


def _pairs(q_pos, k_pos, causal):
    return {(int(q), int(k)) for q, k in itertools.product(q_pos, k_pos) if not causal or k <= q}


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_step_plan_covers_each_causal_pair_once(cp):
    seq_len, local = 4 * cp, 4
    for rank in range(cp):
        q_pos = zigzag_indices(seq_len, cp, rank)
        computed = []
        for step in range(cp):
            source = (rank - step) % cp
            k_pos = zigzag_indices(seq_len, cp, source)
            queries, keys, causal = step_plan(step, rank, cp, True, local)
            qs, ks = q_pos[queries], k_pos[keys]
            block = _pairs(qs, ks, causal=False)
            if causal:  # bottom-right local causal == global causal for a rank's own shard
                block = {(int(qs[i]), int(ks[j])) for i in range(len(qs)) for j in range(len(ks)) if j <= i}
            assert block <= _pairs(qs, ks, causal=True), "a computed pair is masked"
            computed += sorted(block)
        assert len(computed) == len(set(computed)), "a pair is computed twice"
        all_keys = torch.arange(seq_len)
        assert set(computed) == _pairs(q_pos, all_keys, causal=True), "a visible pair is skipped"


def test_non_causal_plan_is_full_blocks():
    assert step_plan(1, 0, 4, False, 6) == (slice(None), slice(None), False)


def test_merge_of_key_blocks_equals_full_softmax():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 4, 8, generator=gen)
    k, v = (torch.randn(2, 9, 2, 8, generator=gen) for _ in range(2))
    full_out, full_lse = block_forward(q, k, v, causal=False, scale=0.4)
    out, lse = block_forward(q, k[:, :4], v[:, :4], causal=False, scale=0.4)
    out_b, lse_b = block_forward(q, k[:, 4:], v[:, 4:], causal=False, scale=0.4)
    merged_out, merged_lse = merge_partials(out.float(), lse, out_b, lse_b)
    torch.testing.assert_close(merged_out, full_out, **TOL)
    torch.testing.assert_close(merged_lse, full_lse, **TOL)


def test_merge_with_empty_rows():
    out = torch.randn(1, 3, 1, 2)
    lse = torch.tensor([[[0.5, float("-inf"), 1.0]]])
    out_b = torch.randn(1, 3, 1, 2)
    lse_b = torch.tensor([[[float("-inf"), 2.0, float("-inf")]]])
    merged_out, merged_lse = merge_partials(out, lse, out_b, lse_b)
    assert torch.equal(merged_lse, torch.tensor([[[0.5, 2.0, 1.0]]]))
    assert torch.equal(merged_out[:, [0, 2]], out[:, [0, 2]])
    torch.testing.assert_close(merged_out[:, 1], out_b[:, 1])
