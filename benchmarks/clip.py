"""Global-norm gradient clipping: foldmoe's (engine/optim/clip.py, fp32 partial sums per
bucket, fp64 only over the partials) against torch.nn.utils.clip_grad_norm_ on the same
gradients, and the fp64-per-element norm it replaced. CPU, one thread.

The gradients are those of the `fine64` model of benchmarks/step_vs_hf.py (its flat fp32
buckets, filled with random values): foldmoe clips its buckets, torch clips one tensor per
parameter holding the same values. max_norm is set below the norm so both really scale.

    python -m benchmarks.clip [--rounds 9]
"""
from __future__ import annotations


import torch

from benchmarks.common import (init_single_process_group, interleaved_rounds, median, median_ratio,
                               print_table, rounds_args, write_json)
from benchmarks.step_vs_hf import SHAPES, TRAIN
from engine.compose import build_trainer
from engine.config.train import TrainConfig
from engine.optim.clip import clip_, global_grad_norm
from engine.parallel.config import ParallelConfig
from engine.parallel.mesh import FoldedMesh


def fp64_norm(buckets) -> float:
    """The norm before issue 11: every element accumulated in fp64."""
    local = torch.zeros((), dtype=torch.float64)
    for bucket in buckets:
        local += torch.linalg.vector_norm(bucket.reduced_grad(), dtype=torch.float64).square()
    return float(local.sqrt())


def main() -> None:
    args = rounds_args(__doc__)
    init_single_process_group()
    mesh = FoldedMesh(ParallelConfig(world_size=1))
    trainer = build_trainer(SHAPES["fine64"], TrainConfig(**TRAIN), mesh)
    buckets = trainer.optimizer.buckets
    gen = torch.Generator().manual_seed(0)
    for bucket in buckets:
        bucket.grad_buffer.copy_(torch.randn(bucket.grad_buffer.shape, generator=gen) * 1e-3)
    params = [p for _, p in trainer.named_params]
    for p in params:
        p.grad = p.main_grad.detach().clone()
    norm = float(global_grad_norm(buckets, mesh))
    torch_norm = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
    exact = fp64_norm(buckets)
    max_norm = 0.5 * norm        # both clip; each call scales by ~0.5 (values stay finite)

    def ours():
        clip_(buckets, global_grad_norm(buckets, mesh), max_norm)

    def theirs():
        torch.nn.utils.clip_grad_norm_(params, max_norm)

    def old():
        clip_(buckets, torch.tensor(fp64_norm(buckets), dtype=torch.float64), max_norm)
    times = interleaved_rounds({"foldmoe": ours, "torch": theirs, "fp64_before": old}, args.rounds)
    numel = sum(b.reduced_grad().numel() for b in buckets)
    result = {"elements": numel, "buckets": len(buckets), "median_s": {k: median(v) for k, v in times.items()},
              "ratio_to_torch": {k: median_ratio(v, times["torch"]) for k, v in times.items()},
              "norm_rel_error_vs_fp64": {"foldmoe": abs(norm - exact) / exact,
                                         "torch": abs(torch_norm - exact) / exact},
              "times_s": times}
    print_table(f"clip_grad_norm, {numel / 1e6:.1f}M fp32 gradient elements in {len(buckets)} buckets, "
                f"CPU, 1 thread, median of {args.rounds} rounds",
                ["variant", "ms", "x torch", "norm rel. error vs fp64"],
                [["foldmoe (fp32 chunks, fp64 partials)", result["median_s"]["foldmoe"] * 1e3,
                  result["ratio_to_torch"]["foldmoe"], result["norm_rel_error_vs_fp64"]["foldmoe"]],
                 ["torch.nn.utils.clip_grad_norm_", result["median_s"]["torch"] * 1e3, 1.0,
                  result["norm_rel_error_vs_fp64"]["torch"]],
                 ["fp64 per element (before)", result["median_s"]["fp64_before"] * 1e3,
                  result["ratio_to_torch"]["fp64_before"], 0.0]])
    write_json("clip", {"rounds": args.rounds, **result}, args.json)


if __name__ == "__main__":
    main()
