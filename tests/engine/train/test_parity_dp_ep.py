"""Whole-model parity of folded DP x EP (x ETP) layouts against one process, both
dispatchers, dropless. Tolerances: engine/testing/parity.py (STEP0_TOL, LATER_TOL)."""
import pytest

from engine.testing.layouts import check_layouts, reference_run

MODEL = {}
TRAIN = dict(global_batch_size=4, global_micro_batch=4, seq_len=16, lr=1e-3, eps=1e-3, warmup_steps=1)


@pytest.fixture(scope="module")
def reference():
    return reference_run(MODEL, TRAIN)


def _cases(layouts):
    return [(f"{name}/{d}", layout, d) for name, layout in layouts.items()
            for d in ("alltoall", "allgather")]


@pytest.mark.slow
def test_world2_dp2_ep2(reference):
    check_layouts(2, _cases({"DP2xEP2": dict(ep=2)}), MODEL, TRAIN, reference)


@pytest.mark.slow
def test_world4_folded_layouts(reference):
    layouts = {"DP4xEP4": dict(ep=4), "DP4xEP2xEDP2": dict(ep=2), "DP4xETP2xEP2": dict(ep=2, etp=2)}
    check_layouts(4, _cases(layouts), MODEL, TRAIN, reference)


# DeepSeek-style router: sigmoid scores, aux-loss-free expert bias, sequence-level aux loss and
# z-loss. CP2 splits every sequence over two ranks, so the per-sequence statistics must be
# all-reduced over tp_cp; EP4 folds over CP and DP.
ROUTER_VARIANT = dict(moe_score_func="sigmoid", moe_expert_bias=True, moe_aux_loss_type="seq",
                      moe_z_loss_coeff=1e-3, qkv_bias=True, tie_embeddings=True)
TRAIN_GMB2 = dict(TRAIN, global_micro_batch=2)


@pytest.mark.slow
def test_router_variants_are_layout_invariant(reference_for):
    cases = [("CP2xDP2/EP4", dict(cp=2, ep=4), "alltoall"),
             ("TP2xDP2/ETP2xEP2", dict(tp=2, ep=2, etp=2), "allgather")]
    check_layouts(4, cases, ROUTER_VARIANT, TRAIN_GMB2, reference_for(ROUTER_VARIANT, TRAIN_GMB2))
