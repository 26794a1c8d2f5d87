"""The counter-based initialisation (engine/models/init.py): a shard's values are exactly the
slice of the full tensor, whatever the slices and the chunking; the values are normal."""
import math

import pytest
import torch

import engine.models.init as init
from engine.config.model import get_preset

CFG = get_preset("tiny-moe")
NAME, SHAPE = "layers.1.moe.experts.w_gate", (8, 30, 40)


def _full(shape=SHAPE, name=NAME, seed=7) -> torch.Tensor:
    out = torch.empty(shape)
    return init.fill_shard_(out, name, shape, (), CFG, seed)


@pytest.mark.parametrize("slices,index", [
    (((0, 2, 4),), (slice(2, 6),)),                                         # EP: experts 2..5
    (((0, 2, 4), (2, 10, 20)), (slice(2, 6), slice(None), slice(10, 30))),   # EP x ETP
    (((1, 0, 20), (1, 5, 10)), (slice(None), slice(5, 15))),                 # two cuts of one dim
    (((2, (1, 3, 39), None),), (slice(None), slice(None), [1, 3, 39])),      # index selection
])
def test_a_shard_is_the_slice_of_the_full_tensor(slices, index):
    full = _full()
    expected = full[index]
    out = torch.empty(expected.shape)
    init.fill_shard_(out, NAME, SHAPE, slices, CFG, 7)
    assert torch.equal(out, expected)


def test_values_do_not_depend_on_the_chunk_size(monkeypatch):
    full = _full()
    monkeypatch.setattr(init, "_CHUNK_ELEMS", 17)     # forces row recursion and odd blocks
    assert torch.equal(_full(), full)


def test_streams_differ_by_seed_and_name_and_repeat_exactly():
    a = _full()
    assert torch.equal(a, _full())
    assert not torch.equal(a, _full(seed=8))
    assert not torch.equal(a, _full(name=NAME.replace("1", "2")))


def test_values_are_standard_normal_scaled_by_the_init_rule():
    z = _full((200_000,), "layers.0.attention.wq.weight") / CFG.init_std
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    tail = (z.abs() > 3).float().mean().item()                 # P(|z| > 3) = 0.0027
    assert 0.002 < tail < 0.0035
    out_proj = _full((1000,), "layers.0.attention.wo.weight")
    assert out_proj.std().item() == pytest.approx(CFG.init_std / math.sqrt(2 * CFG.num_layers), rel=0.1)
    assert torch.equal(_full((5,), "layers.0.attn_norm.weight"), torch.ones(5))
    assert torch.equal(_full((5,), "layers.0.attention.wq.bias"), torch.zeros(5))
