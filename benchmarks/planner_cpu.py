"""The planner's calibrated CPU predictions against measured step times of the real Trainer.

    PYTHONPATH=. python benchmarks/planner_cpu.py [--rounds 7] [--json out.json] [--replay out.json]

1. Build one Trainer per layout on 2 gloo ranks (engine/testing/multiprocess.py), all in the
   same two processes (one thread each), and time `train_step` in interleaved rounds (every
   layout once per round, barriers around each step, rank 0's clock); the median of the
   rounds after a warm-up step is the measured step time.
2. Calibrate in the same processes, once per round between the steps (engine/planner/
   calibrate.py `measure_rank`: GEMM, attention, memory, operator and gloo collective
   rates on both ranks at once), so calibration sees the same machine load as the steps;
   the medians over rounds and ranks are the calibrated rates (including the wait of a
   collective issued after compute, which a loaded machine makes far longer than a
   tight loop of collectives shows). Each round also runs one
   dense and one MoE layer of the model forward + backward in each process (`measure_layer_
   scale`) and divides by the modelled time: the median ratio scales the compute term (the
   engine's allocations, page faults and autograd bookkeeping, which rates do not see). It
   is measured on one process with no parallelism: every parallel effect is predicted.
3. Predict each layout with the calibrated cost model (engine/planner/cost.py) and report
   predicted / measured and Spearman's rank correlation.
Figures are recorded in docs/planner.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from engine.config.model import get_preset
from engine.parallel.config import ParallelConfig
from engine.planner.calibrate import measure_layer_scale, measure_rank, summarize_measurements
from engine.planner.cost import CostConstants, Machine, estimate_step
from engine.planner.devices import DEVICES
from engine.testing.multiprocess import run_distributed
from engine.config.train import TrainConfig
from engine.train.host_allocator import retain_freed_host_memory

MODEL = dict(hidden_size=256, vocab_size=512, num_layers=4, num_heads=8, num_kv_heads=4,
             ffn_hidden_size=512, moe_ffn_hidden_size=256, moe_num_experts=8)
TRAIN = dict(global_batch_size=8, micro_batch_size=2, seq_len=256)
WORLD = 2
# (name, layout, train overrides): every axis, CP ring and all-to-all, both PP schedules, a
# folded one, recompute.
LAYOUTS = [
    ("dp2", {}, {}),
    ("ep2", {"ep": 2}, {}),
    ("etp2", {"etp": 2}, {}),
    ("tp2", {"tp": 2}, {}),
    ("cp2", {"cp": 2}, {}),
    ("cp2 a2a", {"cp": 2, "cp_mode": "a2a"}, {}),
    ("pp2 1f1b", {"pp": 2}, {}),
    ("pp2 vpp2", {"pp": 2, "vpp": 2}, {}),
    ("tp2 x ep2 folded", {"tp": 2, "ep": 2}, {}),
    ("dp2 recompute full", {}, {"recompute": "full"}),
    ("tp2 mbs1", {"tp": 2}, {"micro_batch_size": 1}),
]


def _batch(step: int, cfg, train: TrainConfig) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    return torch.randint(0, cfg.vocab_size, (train.global_batch_size, train.seq_len + 1), generator=gen)


def _measure(rank: int, world: int, layouts: list, rounds: int) -> dict:
    import torch.distributed as dist

    from engine.parallel.mesh import FoldedMesh
    from engine.compose import build_trainer

    retain_freed_host_memory()      # a CPU training worker's allocator (workers/loop.py)
    cfg = get_preset("tiny-moe", **MODEL)
    trainers = {}
    for name, layout, train in layouts:
        train_cfg = TrainConfig(**{**TRAIN, **train})
        mesh = FoldedMesh(ParallelConfig(world_size=world, **layout))
        trainers[name] = (build_trainer(cfg, train_cfg, mesh), train_cfg)
    times: dict[str, list[float]] = {name: [] for name in trainers}
    samples, scales = [], []
    for step in range(rounds + 1):                    # step 0 warms every trainer up
        if step:
            samples.append(measure_rank(rank, world))
            rates = summarize_measurements([samples[-1]], world)
            machine = Machine(DEVICES["cpu"].with_rates(**rates["device"]), world,
                              CostConstants(**rates["constants"]))
            scales.append(measure_layer_scale(cfg, TrainConfig(**TRAIN), machine))
        for name, (trainer, train_cfg) in trainers.items():
            batch = _batch(step, cfg, train_cfg)
            dist.barrier()
            start = time.perf_counter()
            trainer.train_step(step, batch)
            dist.barrier()
            if step:
                times[name].append(time.perf_counter() - start)
    return {"times": times, "samples": samples, "scales": scales}


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(xs):
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        out = [0.0] * len(xs)
        for r, i in enumerate(order):
            out[i] = float(r)
        return out
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def predict(calibrated: dict, layouts: list) -> dict[str, float]:
    device = DEVICES["cpu"].with_rates(**calibrated["device"])
    machine = Machine(device, WORLD, CostConstants(**calibrated["constants"]))
    cfg = get_preset("tiny-moe", **MODEL)
    return {name: estimate_step(cfg, ParallelConfig(world_size=WORLD, **layout),
                                TrainConfig(**{**TRAIN, **train}), machine).step_time_s
            for name, layout, train in layouts}


def report(results: list, stat: str) -> dict:
    """Calibrate, predict and compare with one statistic over the rounds."""
    pick = statistics.median if stat == "median" else min
    calibrated = summarize_measurements([s for r in results for s in r["samples"]], WORLD, stat)
    calibrated["constants"]["compute_scale"] = pick([x for r in results for x in r["scales"]])
    measured = {name: pick(ts) for name, ts in results[0]["times"].items()}
    layouts = [layout for layout in LAYOUTS if layout[0] in measured]   # a replay has its own
    predicted = predict(calibrated, layouts)
    names = [name for name, _, _ in layouts]
    print(f"\n{stat} of the rounds:\n{'layout':<22} {'measured_s':>10} {'predicted_s':>11} {'pred/meas':>9}")
    for name in names:
        print(f"{name:<22} {measured[name]:>10.4f} {predicted[name]:>11.4f} {predicted[name] / measured[name]:>9.3f}")
    rho = spearman([measured[n] for n in names], [predicted[n] for n in names])
    worst = max(abs(predicted[n] / measured[n] - 1) for n in names)
    print(f"Spearman {rho:.3f}; largest |predicted/measured - 1| = {worst:.3f}")
    return {"calibration": calibrated, "measured_s": measured, "predicted_s": predicted, "spearman": rho}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--replay", help="predict again from the measurements of an earlier --json "
                        "file (rank 0's step times, both ranks' calibration samples) with today's model")
    args = parser.parse_args()
    if args.replay:
        with open(args.replay, encoding="utf-8") as handle:
            saved = json.load(handle)
        results = [{"times": saved["rounds"], "samples": saved["samples"], "scales": saved["scales"]}]
        for stat in ("median", "best"):
            report(results, stat)
        return
    print("measuring", len(LAYOUTS), "layouts on", WORLD, "gloo ranks,", args.rounds,
          "rounds (calibration interleaved) ...", flush=True)
    results = run_distributed(_measure, WORLD, LAYOUTS, args.rounds, timeout_s=1800)
    # median: the house statistic; best: each figure's least disturbed round, for a machine
    # shared with other jobs (both from the same rounds)
    out = {stat: report(results, stat) for stat in ("median", "best")}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({**out, "rounds": results[0]["times"],
                       "scales": [x for r in results for x in r["scales"]],
                       "samples": [s for r in results for s in r["samples"]]}, handle, indent=1)


if __name__ == "__main__":
    main()
