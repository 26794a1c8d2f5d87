"""Analytic communication volume, checked against hand-computed numbers."""
import pytest

from engine.context_parallel.volume import LayerShape, a2a_bytes, cp_bytes, llama7b_tables, ring_bytes, tp_sp_bytes

MIB = 1 << 20


def test_ring_by_hand():
    # s 16, b 2, 4 kv heads, d 8, cp 2: K+V message = 2 * 2 * 8 * 4 * 8 = 1024 elements.
    shape = LayerShape(16, 2, 4, 4, 8, elem_bytes=4, grad_acc_bytes=4)
    assert ring_bytes(shape, 2) == {"forward": 1 * 4096, "backward": 1 * 4096 + 2 * 4096}


def test_a2a_by_hand():
    # cp 2: q,k,v (4+4+4 heads) and out (4 heads) of 2*8 tokens * 8 dims, half of each leaves the rank.
    shape = LayerShape(16, 2, 4, 4, 8, elem_bytes=4)
    per_pass = (12 + 4) * 2 * 8 * 8 * 4 // 2
    assert a2a_bytes(shape, 2) == {"forward": per_pass, "backward": per_pass}


def test_a2a_replicates_kv_heads_when_fewer_than_ranks():
    mqa, gqa2 = LayerShape(16, 1, 4, 1, 8), LayerShape(16, 1, 4, 2, 8)
    assert a2a_bytes(mqa, 4) == a2a_bytes(gqa2, 4)  # both travel as 4 kv heads


def test_hybrid_is_a2a_plus_smaller_ring():
    shape = LayerShape(64, 1, 8, 4, 16, elem_bytes=2, grad_acc_bytes=4)
    # cp 4, a2a groups of 2, 16 local tokens: (2*8 + 2*4) heads * 16 tokens * 16 dims, half leaves, 2 bytes
    a2a = 24 * 16 * 16 // 2 * 2
    kv_message = 2 * 16 * 4 * 16  # 32 tokens x 2 kv heads after the a2a == 16 tokens x 4 heads
    assert cp_bytes(shape, 4, 2) == {"forward": a2a + kv_message * 2,
                                     "backward": a2a + kv_message * 2 + 2 * kv_message * 4}


def test_tp_sp_by_hand():
    shape = LayerShape(32768, 1, 32, 32, 128)
    assert tp_sp_bytes(shape, 8)["forward"] == 4 * 7 * 32768 * 4096 * 2 // 8 == 896 * MIB


def test_llama_table_numbers():
    mha = LayerShape(32768, 1, 32, 32, 128)
    assert ring_bytes(mha, 8)["forward"] == 7 * 2 * 4096 * 4096 * 2 == 448 * MIB
    assert a2a_bytes(mha, 8)["forward"] == 112 * MIB
    assert "kv_heads=8" in llama7b_tables()


def test_indivisible_is_an_error():
    with pytest.raises(ValueError):
        ring_bytes(LayerShape(10, 1, 4, 4, 8), 2)
