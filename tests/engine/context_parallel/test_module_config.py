"""Argument checks of the CP cores that need no process group, and Ulysses head arithmetic."""
import pytest

from engine.context_parallel import ContextParallelAttention, split_cp_group
from engine.context_parallel.ulysses import kv_replication


@pytest.mark.parametrize("mode,a2a_size", [("ring", 2), ("a2a", 3), ("hybrid", 1), ("hybrid", 3)])
def test_a2a_size_must_fit_the_mode(mode, a2a_size):
    with pytest.raises(ValueError, match="a2a_size"):
        ContextParallelAttention(None, [0, 1, 2, 3], mode, a2a_size)


def test_unknown_mode():
    with pytest.raises(ValueError, match="expected one of"):
        ContextParallelAttention(None, [0, 1], "striped")


def test_split_cp_group():
    a2a, ring = split_cp_group([4, 5, 6, 7, 12, 13, 14, 15], 2)
    assert a2a == [[4, 5], [6, 7], [12, 13], [14, 15]]
    assert ring == [[4, 6, 12, 14], [5, 7, 13, 15]]


@pytest.mark.parametrize("heads,kv_heads,a2a,factor", [(8, 8, 4, 1), (8, 4, 4, 1), (8, 2, 4, 2),
                                                        (8, 1, 4, 4), (8, 2, 8, 4), (4, 1, 2, 2)])
def test_kv_replication(heads, kv_heads, a2a, factor):
    assert kv_replication(heads, kv_heads, a2a) == factor
    # after replication every rank holds whole kv heads and the q heads that use them
    assert (kv_heads * factor) % a2a == 0 and (heads // a2a) % (heads // (kv_heads * factor)) == 0


def test_heads_not_divisible_by_a2a_size():
    with pytest.raises(ValueError, match="not divisible by the all-to-all size 4"):
        kv_replication(6, 2, 4)
