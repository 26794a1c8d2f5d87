"""Zigzag sharding helpers: hand-checked layout, round trip, causal balance, clear errors."""
import pytest
import torch

from engine.context_parallel import zigzag_indices, zigzag_shard, zigzag_unshard
from engine.context_parallel.zigzag import gathered_to_true_order


def test_indices_by_hand():
    # s = 8, cp = 2: chunks of 2; rank 0 holds chunks 0 and 3, rank 1 holds chunks 1 and 2.
    assert zigzag_indices(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert zigzag_indices(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert zigzag_indices(16, 4, 3).tolist() == [6, 7, 8, 9]


@pytest.mark.parametrize("cp", [1, 2, 4, 8])
def test_shard_matches_indices_and_round_trips(cp):
    seq_len = 4 * cp
    x = torch.randn(3, seq_len, 5)
    shards = [zigzag_shard(x, cp, r) for r in range(cp)]
    for r, shard in enumerate(shards):
        assert torch.equal(shard, x[:, zigzag_indices(seq_len, cp, r)])
    assert torch.equal(zigzag_unshard(shards, cp), x)
    covered = torch.cat([zigzag_indices(seq_len, cp, r) for r in range(cp)]).sort().values
    assert torch.equal(covered, torch.arange(seq_len))


def test_other_dims():
    x = torch.randn(8, 3)
    shards = [zigzag_shard(x, 2, r, dim=0) for r in range(2)]
    assert torch.equal(zigzag_unshard(shards, 2, dim=0), x)


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_causal_balance(cp):
    """Unmasked causal (q, k) pairs per rank: query at position p sees p + 1 keys."""
    seq_len = 6 * cp
    pairs = [int((zigzag_indices(seq_len, cp, r) + 1).sum()) for r in range(cp)]
    assert len(set(pairs)) == 1
    assert pairs[0] * cp == seq_len * (seq_len + 1) // 2


def test_uneven_length_errors():
    with pytest.raises(ValueError, match="not divisible by 2\\*cp=4"):
        zigzag_indices(10, 2, 0)
    with pytest.raises(ValueError, match="not divisible"):
        zigzag_shard(torch.zeros(1, 12), 4, 0)
    with pytest.raises(ValueError, match="cp_rank"):
        zigzag_indices(8, 2, 2)
    with pytest.raises(ValueError, match="shards"):
        zigzag_unshard([torch.zeros(1, 4)], 2)


@pytest.mark.parametrize("cp,group_size", [(2, 2), (4, 4), (4, 2), (8, 2), (8, 4)])
def test_gathered_order_of_a2a_groups(cp, group_size):
    """Shards of a2a group g, concatenated in rank order, reorder to true order, which is the zigzag
    shard of g over cp/group_size super-chunks (what hybrid's ring across groups expects)."""
    seq_len = 4 * cp
    positions = torch.arange(seq_len).unsqueeze(0)
    order = gathered_to_true_order(group_size, seq_len // cp)
    for g in range(cp // group_size):
        members = range(g * group_size, (g + 1) * group_size)
        gathered = torch.cat([zigzag_shard(positions, cp, r) for r in members], dim=1)
        expected = zigzag_indices(seq_len, cp // group_size, g)
        assert torch.equal(gathered[0, order], expected)
