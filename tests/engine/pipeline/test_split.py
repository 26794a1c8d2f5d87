"""Layer split: contiguous, non-empty, cost-balanced chunks; MoE vs dense cost."""
from dataclasses import replace
from itertools import combinations

import pytest

from engine.config.model import ModelConfig, MoEConfig, get_preset
from engine.pipeline.schedules import chunks_of_rank
from engine.pipeline.split import chunk_costs, ffn_cost, head_cost, layer_cost, split_layers

SMALL = ModelConfig(vocab_size=16, hidden_size=8, num_layers=6, num_heads=2, num_kv_heads=1,
                    ffn_hidden_size=16, first_k_dense=2, max_seq_len=4,
                    moe=MoEConfig(num_experts=4, top_k=2, ffn_hidden_size=8,
                                  num_shared_experts=1, shared_ffn_hidden_size=8))


def test_layer_cost_hand_computed():
    # h=8, d=4, n_h=2, n_kv=1, s=4: projections 2*8*(8+8) + 2*8*8 = 384, scores 2*4*2*4 = 64
    assert layer_cost(SMALL, 0, seq_len=4) == 384 + 64 + 6 * 8 * 16          # dense SwiGLU 768
    # router 2*8*4 = 64, routed 2 * 6*8*8 = 768, shared 6*8*8 = 384
    assert ffn_cost(SMALL, 2) == 64 + 768 + 384
    assert head_cost(SMALL) == 2 * 8 * 16 + 4 * 16


def _brute_force_best_max(weights, parts):
    n = len(weights)
    best = None
    for cuts in combinations(range(1, n), parts - 1):
        bounds = (0,) + cuts + (n,)
        worst = max(sum(weights[a:b]) for a, b in zip(bounds, bounds[1:]))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("cfg", [SMALL, replace(SMALL, first_k_dense=0), replace(SMALL, vocab_size=4096),
                                 replace(SMALL, num_layers=8, first_k_dense=3)])
@pytest.mark.parametrize("pp,vpp", [(1, 1), (2, 1), (3, 1), (2, 2), (4, 1)])
def test_split_is_contiguous_complete_and_minimises_the_slowest_chunk(cfg, pp, vpp):
    chunks = split_layers(cfg, pp, vpp)
    assert len(chunks) == pp * vpp and all(chunks)
    assert [i for chunk in chunks for i in chunk] == list(range(cfg.num_layers))
    one_per_layer = chunk_costs(cfg, [[i] for i in range(cfg.num_layers)])
    assert max(chunk_costs(cfg, chunks)) == _brute_force_best_max(one_per_layer, pp * vpp)


def test_dense_layers_are_cheaper_so_the_first_stage_gets_more():
    cfg = replace(SMALL, num_layers=8, first_k_dense=4, vocab_size=4)
    first, second = split_layers(cfg, 2)
    assert len(first) > len(second)


def test_large_vocab_head_pushes_layers_off_the_last_stage():
    cfg = replace(SMALL, first_k_dense=0, vocab_size=2048)   # head 2*8*2048 > one layer
    first, second = split_layers(cfg, 2)
    assert len(first) > len(second)


def test_uniform_layers_split_evenly_on_a_real_preset():
    cfg = get_preset("mixtral-8x22b")   # 56 identical MoE layers
    assert [len(c) for c in split_layers(cfg, 4, 2, seq_len=4096)] == [7] * 8


def test_empty_chunk_error_names_keys():
    with pytest.raises(ValueError, match=r"parallel\.pp=4 x parallel\.vpp=2 .*model\.num_layers=6"):
        split_layers(SMALL, 4, 2)


def test_interleaved_chunk_placement():
    # chunk c = v * pp + r
    assert chunks_of_rank(0, 2, 2) == [0, 2]
    assert chunks_of_rank(3, 4, 3) == [3, 7, 11]
