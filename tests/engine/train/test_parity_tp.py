"""Whole-model parity with tensor + sequence parallelism (and ETP independent of TP)."""
import pytest

from engine.testing.layouts import check_layouts

TRAIN = dict(global_batch_size=4, global_micro_batch=2, seq_len=16, lr=1e-3, eps=1e-3, warmup_steps=1)


@pytest.mark.slow
def test_tp2_sequence_parallel(reference_for):
    check_layouts(2, [("TP2", dict(tp=2), "alltoall")], {}, TRAIN, reference_for({}, TRAIN))


@pytest.mark.slow
def test_tp2_dp2_with_ep_folded_over_tp(reference_for):
    cases = [("TP2xDP2/EP4xETP1", dict(tp=2, ep=4), "alltoall"),
             ("TP2xDP2/ETP2xEP2", dict(tp=2, ep=2, etp=2), "alltoall"),
             ("TP2xDP2/ETP2xEP2/allgather", dict(tp=2, ep=2, etp=2), "allgather")]
    check_layouts(4, cases, {}, TRAIN, reference_for({}, TRAIN))


@pytest.mark.slow
def test_tp4_with_replicated_kv_heads(reference_for):
    model = dict(num_kv_heads=2)   # tiny-moe has 4 heads, 2 kv heads: kv heads < tp
    check_layouts(4, [("TP4", dict(tp=4), "alltoall")], model, TRAIN, reference_for(model, TRAIN))
