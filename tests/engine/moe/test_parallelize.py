"""Expert shard ranges (pure arithmetic; the sharding itself is covered by the parity tests)."""
import pytest

from engine.moe.parallelize import expert_slice


def test_expert_slice_blocks_and_f_shards():
    # E=8 over ep=2 -> 4 experts per rank; F=6 over etp=3 -> 2 columns per rank.
    assert expert_slice(8, 6, ep=2, ep_rank=1, etp=3, etp_rank=2) == (slice(4, 8), slice(4, 6))
    assert expert_slice(8, 6, ep=1, ep_rank=0, etp=1, etp_rank=0) == (slice(0, 8), slice(0, 6))


def test_expert_slice_rejects_uneven_split():
    with pytest.raises(ValueError, match="num_experts=8"):
        expert_slice(8, 6, ep=3, ep_rank=0, etp=1, etp_rank=0)
