"""Whole-model parity of the folded DP x EP (x ETP) layouts against one process.

Tolerance: fp32 with the same math in a different reduction order (sums over ranks,
all-to-all permutations, expert batching). Measured errors are ~1e-7 relative; we allow
2e-5 relative to the tensor's max magnitude, far below any real bug (a wrong scale or a
missing reduction is an O(1) error).
"""
import pytest

from engine.testing.multiprocess import run_distributed
from engine.testing.parity import max_relative_error, train_and_capture

STEPS = 3
TOL = 2e-5
MODEL = {}
TRAIN = dict(global_batch_size=4, micro_batch_size=4, seq_len=16, lr=1e-3, warmup_steps=1)


def _train_per_rank(dp):
    return dict(TRAIN, micro_batch_size=TRAIN["global_batch_size"] // dp)


def _layouts_worker(rank, world, layouts, dispatchers):
    out = {}
    for name, layout in layouts.items():
        for dispatcher in dispatchers:
            dp = world // (layout.get("tp", 1) * layout.get("cp", 1) * layout.get("pp", 1))
            out[(name, dispatcher)] = train_and_capture(
                rank, world, layout, MODEL, _train_per_rank(dp), STEPS, dispatcher)
    return out


@pytest.fixture(scope="module")
def reference():
    return run_distributed(_layouts_worker, 1, {"single": {}}, ["alltoall"])[0][("single", "alltoall")]


def _check(results, reference, label):
    ref_losses = [m["loss"] for m in reference["metrics"]]
    report = {}
    for rank, per_case in enumerate(results):
        for case, result in per_case.items():
            losses = [m["loss"] for m in result["metrics"]]
            for a, b in zip(losses, ref_losses):
                assert abs(a - b) <= TOL * abs(b), (label, case, rank, losses, ref_losses)
            err, where = max_relative_error(result, reference)
            assert err <= TOL, (label, case, rank, err, where)
            report[case] = max(report.get(case, 0.0), err)
    print(f"\n{label} max relative grad error per case: {report}")


@pytest.mark.slow
def test_world2_dp2_ep2(reference):
    layouts = {"DP2xEP2": dict(ep=2)}
    _check(run_distributed(_layouts_worker, 2, layouts, ["alltoall", "allgather"]), reference, "world2")


@pytest.mark.slow
def test_world4_folded_layouts(reference):
    layouts = {"DP4xEP4": dict(ep=4), "DP4xEP2xEDP2": dict(ep=2), "DP4xETP2xEP2": dict(ep=2, etp=2)}
    _check(run_distributed(_layouts_worker, 4, layouts, ["alltoall", "allgather"], timeout_s=400),
           reference, "world4")
