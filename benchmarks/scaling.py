"""The same global batch on 1, 2 and 4 gloo ranks (EP, TP+SP and CP layouts): step time,
parallel efficiency and the time each rank waits in collectives.

Strong scaling: every layout trains the same model on the same global batch (8 sequences
of 256 tokens in 2 global micro-batches of 4), so the work is fixed and
    efficiency(N) = T_1 / (N * T_N)        (1 = perfect),
    efficiency_cores(N) = T_1 / (min(N, cores) * T_N)
(the second discounts ranks that share a core: 4 ranks on a 2-core machine can at best
halve the time), and
    efficiency_machine(N) = T_1 / (S(N) * T_N),   S(N) = N * t_1 / t_N(matmul),
against what the machine really gives N concurrent processes: S(N) is the measured
throughput gain of N processes each running the same fixed matmul loop (no communication)
right before the run; other jobs on shared cores and SMT siblings make it well below N.
Collective time is the wall time inside torch.distributed calls and
wait()s (benchmarks/collective_timer.py), averaged over ranks: transfer plus waiting for
the slowest rank, what a GPU stream would see as a stall. The layouts of one world size run
in the same processes, one step each in turn (interleaved); each world size is a separate
spawn. CPU, one thread per rank.

    python -m benchmarks.scaling [--steps 4] [--worlds 1,2,4]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from benchmarks.common import one_thread, print_table, write_json
from benchmarks.collective_timer import CollectiveTimer
from engine.config.model import ModelConfig, MoEConfig
from engine.config.train import TrainConfig
from engine.testing.multiprocess import run_distributed

MODEL = ModelConfig(vocab_size=2048, hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=4,
                    ffn_hidden_size=1024, first_k_dense=1, max_seq_len=256,
                    moe=MoEConfig(num_experts=8, top_k=2, ffn_hidden_size=512))
GLOBAL_BATCH, GLOBAL_MICRO, SEQ = 8, 4, 256
LAYOUTS = {1: {"single": {}},
           2: {"EP2 (DP2)": dict(ep=2), "TP2+SP": dict(tp=2), "CP2": dict(cp=2)},
           4: {"EP4 (DP4)": dict(ep=4), "TP4+SP": dict(tp=4), "CP4": dict(cp=4)}}


def _trainer(world: int, layout: dict):
    from engine.compose import build_trainer
    from engine.parallel.config import ParallelConfig
    from engine.parallel.mesh import FoldedMesh
    mesh = FoldedMesh(ParallelConfig(world_size=world, **layout))
    train = TrainConfig(global_batch_size=GLOBAL_BATCH, micro_batch_size=GLOBAL_MICRO // mesh.config.dp,
                        seq_len=SEQ, warmup_steps=1)
    return build_trainer(MODEL, train, mesh)


def burn_worker(rank: int, world: int) -> float:
    """Seconds for a fixed single-thread matmul loop (all ranks at once, no communication)."""
    one_thread()
    a, b = torch.randn(768, 768), torch.randn(768, 768)
    start = time.perf_counter()
    for _ in range(40):
        a @ b
    return time.perf_counter() - start


def machine_speedup(worlds) -> dict[int, float]:
    """S(N): throughput of N concurrent single-thread processes relative to one."""
    alone = statistics.median(run_distributed(burn_worker, 1)[0] for _ in range(3))
    return {w: 1.0 if w == 1 else w * alone / max(run_distributed(burn_worker, w)) for w in worlds}


def scaling_worker(rank: int, world: int, steps: int) -> dict:
    from engine.testing.parity import synthetic_global_batch
    one_thread()
    timer = CollectiveTimer().install()
    trainers = {name: _trainer(world, layout) for name, layout in LAYOUTS[world].items()}
    batch = synthetic_global_batch(0, GLOBAL_BATCH, SEQ, MODEL.vocab_size)
    out = {name: {"step_s": [], "collective_s": [], "loss": None} for name in trainers}
    names = list(trainers)
    for step in range(steps + 1):                     # step 0: warm-up
        for name in names[step % len(names):] + names[:step % len(names)]:
            timer.reset()
            start = time.perf_counter()
            metrics = trainers[name].train_step(step, batch)
            if step:
                out[name]["step_s"].append(time.perf_counter() - start)
                out[name]["collective_s"].append(timer.seconds)
            out[name]["loss"] = metrics["loss"]
    return out


def summarize(per_world: dict[int, list[dict]], speedup: dict[int, float]) -> list[dict]:
    cores = os.cpu_count() or 1
    base = statistics.median(per_world[1][0]["single"]["step_s"])
    rows = []
    for world, ranks in per_world.items():
        for name in ranks[0]:
            # a step ends when the slowest rank ends: max over ranks, median over steps
            step_s = statistics.median(max(r[name]["step_s"][i] for r in ranks)
                                       for i in range(len(ranks[0][name]["step_s"])))
            coll_s = statistics.mean(statistics.median(r[name]["collective_s"]) for r in ranks)
            rows.append({"world": world, "layout": name, "step_s": step_s, "collective_s": coll_s,
                         "collective_fraction": coll_s / step_s,
                         "efficiency": base / (world * step_s),
                         "efficiency_cores": base / (min(world, cores) * step_s),
                         "machine_speedup": speedup[world],
                         "efficiency_machine": base / (speedup[world] * step_s),
                         "loss": ranks[0][name]["loss"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    worlds = [int(w) for w in args.worlds.split(",")]
    speedup = machine_speedup(worlds)
    per_world = {w: run_distributed(scaling_worker, w, args.steps, timeout_s=900) for w in worlds}
    rows = summarize(per_world, speedup)
    print_table(f"strong scaling, {GLOBAL_BATCH} x {SEQ} tokens per step, median of {args.steps} steps, "
                f"{os.cpu_count()} cores",
                ["ranks", "layout", "step s", "in collectives s", "fraction", "efficiency",
                 "eff. (cores)", "machine S(N)", "eff. (machine)", "loss"],
                [[r["world"], r["layout"], r["step_s"], r["collective_s"], r["collective_fraction"],
                  r["efficiency"], r["efficiency_cores"], r["machine_speedup"], r["efficiency_machine"],
                  r["loss"]] for r in rows])
    write_json("scaling", {"steps": args.steps, "model": MODEL.__dict__ | {"moe": MODEL.moe.__dict__},
                           "rows": rows}, args.json)


if __name__ == "__main__":
    main()
