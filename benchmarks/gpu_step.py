"""The GPU variant: a Mixtral-8x7B-shaped model at full width, a few layers, bf16, world 1.

Measures the foldmoe training step (Trainer.train_step on a world-1 NCCL mesh: bf16 params,
fp32 main grads and master weights, flat buckets, routing statistics, metrics) and reports
step time, model TFLOP/s (engine.metrics.model_flops_per_iteration) and MFU against the
device's dense bf16 datasheet peak (engine/metrics/peak.py: 989 TFLOP/s for H100/H200 SXM),
plus the expert grouped GEMM alone: the SwiGLU forward + backward over the step's
T k expert-sorted rows (engine.moe.experts.grouped_swiglu, torch._grouped_mm) and one
forward GEMM, each as TFLOP/s and as a fraction of the peak. Peak memory is
torch.cuda.max_memory_allocated over the timed steps.

Needs a CUDA device; without one it says so in one line and exits with status 2 (nothing
is measured). Hidden 4096, FFN 14336, 32 heads / 8 KV heads, vocab 32000, 8 experts top-2.

    python -m benchmarks.gpu_step [--layers 2] [--batch 2] [--seq 4096] [--steps 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from benchmarks.common import free_port, print_table, write_json


def _require_cuda() -> None:
    if not torch.cuda.is_available():
        print("gpu_step: needs a CUDA device (torch.cuda.is_available() is False); nothing measured",
              file=sys.stderr)
        raise SystemExit(2)


def _model(layers: int, seq: int):
    from engine.config.model import get_preset
    return get_preset("mixtral-8x7b", num_layers=layers, max_seq_len=seq)


def _init_nccl() -> None:
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                world_size=1, device_id=torch.device("cuda", 0))


def _timed(fn, device, repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls, CUDA events around each."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure_step(cfg, batch: int, seq: int, steps: int, device) -> dict:
    from engine.compose import build_trainer
    from engine.config.train import TrainConfig
    from engine.parallel.config import ParallelConfig
    from engine.parallel.mesh import FoldedMesh
    from engine.testing.parity import synthetic_global_batch
    mesh = FoldedMesh(ParallelConfig(world_size=1))
    train = TrainConfig(global_batch_size=batch, micro_batch_size=batch, seq_len=seq, precision="bf16",
                        warmup_steps=1)
    trainer = build_trainer(cfg, train, mesh, device=device)
    tokens = synthetic_global_batch(0, batch, seq, cfg.vocab_size)
    for step in range(2):                                   # warm-up: kernels, allocator
        trainer.train_step(step, tokens)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(2, 2 + steps):
        start = time.perf_counter()
        trainer.train_step(step, tokens)                    # ends with a host read: synchronised
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    out = {"step_s": step_s, "step_times_s": times, "model_flops": trainer.model_flops,
           "peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)),
           "param_bytes": trainer.param_bytes}
    del trainer
    torch.cuda.empty_cache()
    return out


def measure_grouped_gemm(cfg, rows_per_token: int, tokens: int, device, repeats: int = 10) -> dict:
    from engine.moe.assignment import build_assignments
    from engine.moe.experts import grouped_gemm_supported, grouped_swiglu
    moe, h = cfg.moe, cfg.hidden_size
    gen = torch.Generator(device=device).manual_seed(0)
    probs, chosen = torch.rand(tokens, moe.num_experts, device=device, generator=gen).topk(moe.top_k, -1)
    counts_e = build_assignments(probs, chosen, moe.num_experts).counts_e
    n = tokens * rows_per_token
    bf16 = dict(device=device, dtype=torch.bfloat16)
    x = (torch.randn(n, h, **bf16) * 0.1).requires_grad_(True)
    w = [(torch.randn(moe.num_experts, h, moe.ffn_hidden_size, **bf16) * 0.02).requires_grad_(True),
         (torch.randn(moe.num_experts, h, moe.ffn_hidden_size, **bf16) * 0.02).requires_grad_(True),
         (torch.randn(moe.num_experts, moe.ffn_hidden_size, h, **bf16) * 0.02).requires_grad_(True)]
    grad = torch.randn(n, h, **bf16)
    offs = torch.cumsum(counts_e, 0, dtype=torch.int32)

    def swiglu_fwd_bwd():
        grouped_swiglu(x, counts_e, *w).backward(grad)
        for t in (x, *w):
            t.grad = None

    def one_gemm():
        torch._grouped_mm(x.detach(), w[0].detach(), offs=offs)
    swiglu_fwd_bwd(), one_gemm()
    swiglu_s, gemm_s = _timed(swiglu_fwd_bwd, device, repeats), _timed(one_gemm, device, repeats)
    ffn = moe.ffn_hidden_size
    return {"rows": n, "kernel": "torch._grouped_mm" if grouped_gemm_supported(x, w[0]) else "unbind loop",
            "swiglu_fwd_bwd_s": swiglu_s, "swiglu_tflops": 18 * n * h * ffn / swiglu_s / 1e12,
            "one_gemm_s": gemm_s, "one_gemm_tflops": 2 * n * h * ffn / gemm_s / 1e12}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, choices=(2, 3, 4))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    _require_cuda()
    from engine.metrics.peak import mfu, peak_flops_per_device, tflops_per_device
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    _init_nccl()
    cfg = _model(args.layers, args.seq)
    peak, peak_source = peak_flops_per_device(device, torch.bfloat16)
    step = measure_step(cfg, args.batch, args.seq, args.steps, device)
    gemm = measure_grouped_gemm(cfg, cfg.moe.top_k, args.batch * args.seq, device)
    step["tflops"] = tflops_per_device(step["model_flops"], step["step_s"], 1)
    step["mfu"] = mfu(step["model_flops"], step["step_s"], 1, peak)
    gemm["swiglu_fraction_of_peak"] = gemm["swiglu_tflops"] * 1e12 / peak
    gemm["one_gemm_fraction_of_peak"] = gemm["one_gemm_tflops"] * 1e12 / peak
    print_table(f"{torch.cuda.get_device_name(device)}: Mixtral-8x7B shape, {args.layers} layers, bf16, "
                f"B x s = {args.batch} x {args.seq}, peak {peak / 1e12:.0f} TFLOP/s ({peak_source})",
                ["what", "time s", "TFLOP/s", "of peak", "peak mem GB"],
                [["train step", step["step_s"], step["tflops"], step["mfu"], step["peak_memory_bytes"] / 1e9],
                 [f"expert SwiGLU fwd+bwd ({gemm['rows']} rows, {gemm['kernel']})", gemm["swiglu_fwd_bwd_s"],
                  gemm["swiglu_tflops"], gemm["swiglu_fraction_of_peak"], "-"],
                 ["one grouped GEMM fwd (gate)", gemm["one_gemm_s"], gemm["one_gemm_tflops"],
                  gemm["one_gemm_fraction_of_peak"], "-"]])
    write_json("gpu_step", {"args": vars(args), "peak_flops": peak, "peak_source": peak_source,
                            "step": step, "grouped_gemm": gemm}, args.json)


if __name__ == "__main__":
    main()
