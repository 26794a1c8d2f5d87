"""The planner's GEMM terms against the device: every GEMM of one layer (and the head) of
the layouts that a search ranks first, timed alone at the shapes one rank runs.

    PYTHONPATH=. python benchmarks/planner_gemms.py [--preset qwen2-57b-a14b] [--gpus 64]
        [--gpu h100] [--top 5] [--only tp=2,pp=4,ep=4] [--rounds 7] [--device cuda|cpu] [--seq 4096]

The layouts: the first `--top` rows of `search_layouts` (the paper's setting: GBS 256,
seq 4096, bf16, ZeRO-1, capacity factor 1) plus the fastest row matching each `--only`.
For each, `engine.planner.cost.layer_gemms` lists the GEMMs of a dense and of a MoE layer
(projections, router, the grouped experts as one `torch._grouped_mm` over the local
experts, shared experts) and `head_gemm` the head; each is timed forward, median of
`--rounds` (CUDA events on a GPU, bf16; perf_counter and fp32 on CPU, one thread), next
to the planner's prediction for the `--gpu` row of the device table. The ratio
measured / predicted per GEMM and per layer shows whether the shape-efficiency model
(rate x m/(m + 128) x n/(n + 128), docs/planner.md) ranks the layouts as the device does:
e.g. whether 1,024-row experts (EP4) really run slower than 2,048-row ones (EP8).
Writes every figure to benchmarks/results/planner_gemms.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import torch

from benchmarks.common import one_thread, write_json
from engine.config.model import get_preset
from engine.config.train import TrainConfig
from engine.planner.cost import Gemm, Machine, head_gemm, layer_gemms
from engine.planner.devices import DEVICES
from engine.planner.search import search_layouts

PAPER_TRAIN = TrainConfig(global_batch_size=256, seq_len=4096, precision="bf16", zero1=True,
                          overlap_grad_reduce=True)


def _operands(gemm: Gemm, dtype, device):
    m, k, n = max(1, round(gemm.m)), gemm.k, gemm.n
    if gemm.count == 1:
        a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
        return lambda: a @ b
    x = torch.randn(gemm.count * m, k, dtype=dtype, device=device)
    w = torch.randn(gemm.count, k, n, dtype=dtype, device=device)
    offs = torch.arange(1, gemm.count + 1, dtype=torch.int32, device=device) * m
    return lambda: torch._grouped_mm(x, w, offs=offs)


def time_gemm(gemm: Gemm, rounds: int, device: str) -> float:
    """Median seconds of one forward of `gemm` (grouped over its count)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    run = _operands(gemm, dtype, device)
    run()
    times = []
    for _ in range(rounds):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            run()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def _layouts(args, cfg, mach, train):
    rows = search_layouts(cfg, train, args.gpus, mach, memory_limit=mach.device.memory_bytes).rows
    chosen = list(rows[:args.top])
    for only in args.only:
        want = {k: int(v) for k, v in (kv.split("=") for kv in only.split(","))}
        match = next((r for r in rows if all(getattr(r.parallel, k) == v for k, v in want.items())), None)
        if match is None:
            raise SystemExit(f"planner_gemms: no feasible layout matches --only {only}")
        if match not in chosen:
            chosen.append(match)
    return rows, chosen


def _label(row) -> str:
    p = row.parallel
    return f"tp{p.tp} cp{p.cp} pp{p.pp} vpp{p.vpp} ep{p.ep} etp{p.etp} mbs{row.micro_batch_size}"


def measure(args) -> dict:
    cfg = get_preset(args.preset, moe_capacity_factor=1.0)
    mach = Machine(DEVICES[args.gpu], gpus_per_node=8)
    e = 2 if PAPER_TRAIN.precision == "bf16" else 4
    base = dataclasses.replace(PAPER_TRAIN, seq_len=args.seq)
    rows, chosen = _layouts(args, cfg, mach, base)
    out = []
    for row in chosen:
        train = dataclasses.replace(base, micro_batch_size=row.micro_batch_size)
        parts = {"dense layer": layer_gemms(cfg, False, row.parallel, train),
                 "moe layer": layer_gemms(cfg, True, row.parallel, train),
                 "head": [head_gemm(cfg, row.parallel, train)]}
        entry = {"layout": _label(row), "rank": rows.index(row), "mfu": row.mfu, "parts": {}}
        for part, gemms in parts.items():
            if part == "dense layer" and cfg.num_dense_layers == 0:
                continue
            figures = [{"name": g.name, "m": g.m, "k": g.k, "n": g.n, "count": g.count,
                        "predicted_s": g.forward_s(e, mach), "measured_s": time_gemm(g, args.rounds, args.device)}
                       for g in gemms]
            entry["parts"][part] = figures
        out.append(entry)
    return {"preset": args.preset, "gpus": args.gpus, "gpu_row": args.gpu, "device": args.device,
            "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "layouts": out}


def _print(result: dict) -> None:
    print(f"{result['preset']} on {result['gpus']} x {result['gpu_row']} (predicted) vs "
          f"{result['device_name']} (measured), forward ms per micro-batch")
    for entry in result["layouts"]:
        print(f"\n#{entry['rank']} {entry['layout']}  predicted MFU {entry['mfu']:.1%}")
        for part, figures in entry["parts"].items():
            pred = sum(f["predicted_s"] for f in figures)
            got = sum(f["measured_s"] for f in figures)
            print(f"  {part:<12} predicted {pred * 1e3:8.3f}  measured {got * 1e3:8.3f}  ratio {got / pred:5.2f}")
            for f in figures:
                shape = f"[{f['m']:.0f},{f['k']}]x[{f['k']},{f['n']}]" + (f" x{f['count']}" if f["count"] > 1 else "")
                print(f"    {f['name']:<16} {shape:<30} {f['predicted_s'] * 1e3:8.3f} {f['measured_s'] * 1e3:8.3f}"
                      f"  {f['measured_s'] / f['predicted_s']:5.2f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="qwen2-57b-a14b")
    parser.add_argument("--gpus", type=int, default=64)
    parser.add_argument("--gpu", default="h100", choices=sorted(k for k in DEVICES if k != "cpu"))
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--only", action="append", default=[], help="e.g. tp=2,pp=4,ep=4 (repeatable)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seq", type=int, default=PAPER_TRAIN.seq_len, help="sequence length (4096: the paper's)")
    parser.add_argument("--json", default=None, help="default: benchmarks/results/planner_gemms.json")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("planner_gemms: --device cuda needs a CUDA device; nothing measured", file=sys.stderr)
        raise SystemExit(2)
    if args.device == "cpu":
        one_thread()
    result = measure(args)
    _print(result)
    write_json("planner_gemms", result, args.json)


if __name__ == "__main__":
    main()
