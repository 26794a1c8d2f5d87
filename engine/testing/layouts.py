"""Runs several parallel layouts in one spawned job and compares each with one process.

Parity holds when the single-process reference sees the same *global micro-batches*
(dp x micro_batch_size sequences each, see engine/train/batch.py), so each reference is
keyed by that size.
"""
from __future__ import annotations

from engine.testing.multiprocess import run_distributed
from engine.testing.parity import assert_parity, train_and_capture

STEPS = 3


def dp_of(world: int, layout: dict) -> int:
    return world // (layout.get("tp", 1) * layout.get("cp", 1) * layout.get("pp", 1))


def layouts_worker(rank: int, world: int, cases: list, model: dict, train: dict) -> dict:
    """cases: [(name, layout, dispatcher)]; micro_batch_size is chosen per layout so that
    dp x mbs equals train["global_micro_batch"]."""
    out = {}
    for name, layout, dispatcher in cases:
        train_cfg = {k: v for k, v in train.items() if k != "global_micro_batch"}
        train_cfg["micro_batch_size"] = train["global_micro_batch"] // dp_of(world, layout)
        out[name] = train_and_capture(rank, world, layout, model, train_cfg, STEPS, dispatcher)
    return out


def reference_run(model: dict, train: dict) -> dict:
    return run_distributed(layouts_worker, 1, [("single", {}, "alltoall")], model, train)[0]["single"]


def check_layouts(world: int, cases: list, model: dict, train: dict, reference: dict,
                  timeout_s: float = 400) -> dict[str, float]:
    """Runs the cases on `world` ranks; asserts parity on every rank; returns step-0 errors."""
    results = run_distributed(layouts_worker, world, cases, model, train, timeout_s=timeout_s)
    report: dict[str, float] = {}
    for rank, per_case in enumerate(results):
        for name, result in per_case.items():
            err = assert_parity(result, reference, f"{name} rank {rank}")
            report[name] = max(report.get(name, 0.0), err)
    print(f"\nstep-0 max relative gradient error on {world} ranks: "
          + ", ".join(f"{k}: {v:.1e}" for k, v in report.items()))
    return report
