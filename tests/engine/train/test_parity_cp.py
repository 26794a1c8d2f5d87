"""Whole-model parity with context parallelism (zigzag ring, all-to-all, hybrid)."""
import pytest

from engine.testing.layouts import check_layouts

TRAIN = dict(global_batch_size=4, global_micro_batch=2, seq_len=16, lr=1e-3, eps=1e-3, warmup_steps=1)


@pytest.mark.slow
def test_cp2_ring_and_a2a(reference_for):
    cases = [("CP2/ring", dict(cp=2), "alltoall"),
             ("CP2/a2a", dict(cp=2, cp_mode="a2a"), "alltoall")]
    check_layouts(2, cases, {}, TRAIN, reference_for({}, TRAIN))


@pytest.mark.slow
def test_world4_cp_layouts(reference_for):
    cases = [("CP4/ring", dict(cp=4), "alltoall"),
             ("CP4/hybrid-a2a2", dict(cp=4, cp_mode="hybrid", cp_a2a_size=2), "alltoall"),
             ("CP2xTP2", dict(cp=2, tp=2), "alltoall"),
             ("CP2xDP2/EP4", dict(cp=2, ep=4), "alltoall")]
    check_layouts(4, cases, {}, TRAIN, reference_for({}, TRAIN))
