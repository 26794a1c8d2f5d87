"""Whole-model parity with pipeline parallelism and the full 5D composition."""
import pytest

from engine.testing.layouts import check_layouts

# dp = 1 layouts: 4 micro-batches of 1 sequence, enough for pp 4 and for interleaving.
TRAIN = dict(global_batch_size=4, global_micro_batch=1, seq_len=16, lr=1e-3, eps=1e-3, warmup_steps=1)
TRAIN_DP2 = dict(TRAIN, global_micro_batch=2)


@pytest.mark.slow
def test_pp2_1f1b_interleaved_and_tied(reference_for):
    check_layouts(2, [("PP2/1f1b", dict(pp=2), "alltoall"),
                      ("PP2xVPP2/interleaved", dict(pp=2, vpp=2), "alltoall")],
                  {}, TRAIN, reference_for({}, TRAIN))
    tied = dict(tie_embeddings=True)
    check_layouts(2, [("PP2/tied", dict(pp=2), "alltoall")], tied, TRAIN, reference_for(tied, TRAIN))


@pytest.mark.slow
def test_world4_pp_layouts(reference_for):
    check_layouts(4, [("PP4", dict(pp=4), "alltoall"),
                      ("PP2xTP2", dict(pp=2, tp=2), "alltoall"),
                      ("PP2xCP2", dict(pp=2, cp=2), "alltoall")],
                  {}, TRAIN, reference_for({}, TRAIN))
    check_layouts(4, [("PP2xDP2/EP2", dict(pp=2, ep=2), "alltoall")],
                  {}, TRAIN_DP2, reference_for({}, TRAIN_DP2))


@pytest.mark.slow
def test_full_5d_on_8_ranks(reference_for):
    # attention TP2 x CP2 x PP2 (dp 1); MoE ETP1 x EP4 (edp 1) and EP2 x EDP2, both folded
    cases = [("TP2xCP2xPP2/EP4", dict(tp=2, cp=2, pp=2, ep=4), "alltoall"),
             ("TP2xCP2xPP2/EP2xEDP2", dict(tp=2, cp=2, pp=2, ep=2), "allgather")]
    check_layouts(8, cases, {}, TRAIN, reference_for({}, TRAIN), timeout_s=600)
