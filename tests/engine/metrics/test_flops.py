"""Megatron FLOPs formula against hand arithmetic.

Written as 6·N_active·T + 6·B·s²·L·n_h·d, where N_active is the hand-summed count of
weights each token multiplies (experts it is routed to, shared experts, attention
projections, output head): the same formula regrouped, with the sums done by hand and
checked against the published active-parameter counts.
"""
import pytest

from engine.metrics.flops import model_flops_per_iteration
from engine.config.model import get_preset

REL = 1e-12  # float(int) conversion only


def _causal_attention(batch, seq, layers, heads, head_dim):
    return 6 * batch * seq ** 2 * layers * heads * head_dim


def test_mixtral_8x7b():
    # per layer: 2 routed experts x 3·4096·14336, q/o 4096², k/v 4096·1024; head 4096·32000
    active = 32 * (2 * 3 * 4096 * 14336 + 4096 * (4096 + 2 * 1024) + 4096 * 4096) + 4096 * 32000
    assert active == 12_747_538_432  # = 32 · 394_264_576 + 131_072_000
    # published: 12.9B active including the 0.131B input embedding
    assert abs(active + 4096 * 32000 - 12.9e9) / 12.9e9 < 0.01
    batch, seq = 8, 4096
    expected = 6 * active * batch * seq + _causal_attention(batch, seq, 32, 32, 128)
    got = model_flops_per_iteration(get_preset("mixtral-8x7b"), batch, seq)
    assert got == pytest.approx(expected, rel=REL)


def test_mixtral_8x22b_paper_config():
    # per layer: 2 x 3·6144·16384 + 6144·(6144 + 2·1024) + 6144²; head 6144·32768
    active = 56 * (2 * 3 * 6144 * 16384 + 6144 * (6144 + 2 * 1024) + 6144 * 6144) + 6144 * 32768
    assert active == 38_956_695_552  # = 56 · 692_060_160 + 201_326_592; published ~39B active
    batch, seq = 256, 4096  # the paper's GBS 256, seq 4K
    expected = 6 * active * batch * seq + _causal_attention(batch, seq, 56, 48, 128)
    got = model_flops_per_iteration(get_preset("mixtral-8x22b"), batch, seq)
    assert got == pytest.approx(expected, rel=REL)
    assert got == pytest.approx(2.5396e17, rel=1e-4)


def test_qwen2_57b_a14b():
    # 8 routed x 3·3584·2560 + shared 3·3584·20480 + q/o 3584², k/v 3584·512; head 3584·151936
    active = (28 * (8 * 3 * 3584 * 2560 + 3 * 3584 * 20480 + 3584 * (3584 + 2 * 512) + 3584 * 3584)
              + 3584 * 151936)
    assert active == 13_697_875_968  # = 28 · 469_762_048 + 544_538_624; "A14B" incl. embedding
    batch, seq = 4, 2048
    expected = 6 * active * batch * seq + _causal_attention(batch, seq, 28, 28, 128)
    got = model_flops_per_iteration(get_preset("qwen2-57b-a14b"), batch, seq)
    assert got == pytest.approx(expected, rel=REL)


def test_deepseek_moe_16b_first_layer_dense():
    dense_ffn = 3 * 2048 * 10944                 # layer 0
    moe_ffn = (6 + 2) * 3 * 2048 * 1408          # 6 routed + 2 shared experts, layers 1..27
    attention = 2048 * (2048 + 2 * 2048) + 2048 * 2048  # MHA: 16 kv heads x 128
    active = dense_ffn + 27 * moe_ffn + 28 * attention + 2048 * 102400
    assert active == 2_615_279_616  # published 2.8B active incl. the 0.21B embedding
    batch, seq = 2, 4096
    expected = 6 * active * batch * seq + _causal_attention(batch, seq, 28, 16, 128)
    got = model_flops_per_iteration(get_preset("deepseek-moe-16b"), batch, seq)
    assert got == pytest.approx(expected, rel=REL)


def test_tiny_moe_exact_value():
    # dense layer 3·64·128 = 24_576; 3 MoE layers x (2 routed + 1 shared) x 3·64·32 = 55_296;
    # attention 4 x (64·(64+64) + 64·64) = 49_152; head 64·512 = 32_768; sum 161_792
    # B=2, s=16: 6·161_792·32 + 6·2·16²·4·4·16 = 31_064_064 + 786_432
    assert model_flops_per_iteration(get_preset("tiny-moe"), 2, 16) == 31_850_496.0


def test_rejects_empty_batch():
    with pytest.raises(ValueError, match="global_batch_size"):
        model_flops_per_iteration(get_preset("tiny-moe"), 0, 16)
