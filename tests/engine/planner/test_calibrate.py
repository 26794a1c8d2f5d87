"""`--calibrate`'s processes and collective figures: the gloo branch runs here; the NCCL
branch (one process per GPU) needs GPUs and is not run on this CPU machine."""
from __future__ import annotations

import pytest
import torch

from engine.planner.calibrate import SMALL_BYTES, LARGE_BYTES, measure_collectives, summarize_measurements
from engine.planner.calibrate_ranks import CalibrationUnavailable, backend_for, calibration_world, run_ranks


def _collectives(rank: int, world: int, device: str) -> dict:
    return measure_collectives(device=device, repeats=3)


def test_backend_follows_the_device():
    assert backend_for("cuda") == "nccl" and backend_for("cpu") == "gloo"
    assert calibration_world("cpu", 2) == 2


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has GPUs to calibrate")
def test_gpu_calibration_without_gpus_is_a_clear_error():
    with pytest.raises(CalibrationUnavailable, match="at least 2 visible GPUs"):
        calibration_world("cuda", 2)


def test_gloo_collectives_fit_latency_bandwidth_and_sync_wait():
    per_rank = run_ranks(_collectives, 2, "cpu", timeout_s=300)
    assert len(per_rank) == 2
    for sample in per_rank:
        # (no small < large check: on a machine shared with other jobs a median of 3 small
        # calls can be descheduled past a large one)
        assert all(sample[f"{kind}_{size}"] > 0 for kind in ("a2a", "allreduce")
                   for size in (SMALL_BYTES, LARGE_BYTES))
        assert sample["sync_wait_s"] >= 0.0
    # the summary needs the compute figures too: take them as given, check the link fit
    compute = {"gemm_flops": 1e10, "attention_flops": 5e9, "attention_half_block": 32.0,
               "memory_bytes_per_s": 1e10, "op_overhead_s": 1e-5, "optimizer_s_per_elem": 1e-8}
    out = summarize_measurements([{**compute, **s} for s in per_rank], 2)
    measured = out["measured"]
    assert out["device"]["intra_node_bytes_per_s"] == out["device"]["inter_node_bytes_per_s"] > 0
    assert out["constants"]["collective_latency_s"] == pytest.approx(
        measured["allreduce_latency_s"] + measured["sync_wait_s"])
    gpu = summarize_measurements([{**compute, **s} for s in per_rank], 2, device="cuda")
    assert "inter_node_bytes_per_s" not in gpu["device"]      # one node: the network stays the datasheet's
