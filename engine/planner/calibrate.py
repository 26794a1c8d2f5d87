"""`foldmoe plan --calibrate`: measure this machine's rates and use them instead of the table.

Measured, per worker (one thread per CPU worker, as `cluster.cpus_per_worker: 1` runs):
- GEMM rate: best 2n^3/t of n x n matmuls (fp32 on CPU, bf16 on GPU); the cost model's
  peak becomes this rate and its GEMM efficiency 1;
- attention rate: the engine's own local attention core (engine/attention/core.py),
  forward + backward, as FLOPs per second of its causal work;
- memory bandwidth: bytes read + written by a large tensor copy;
- operator overhead: seconds per small aten op under autograd (forward and backward ops
  of a chain of tiny multiplications), what dominates a small model's step on a CPU;
- collectives: all-to-all and all-reduce on 2 ranks (gloo on CPU, NCCL on GPU) at a
  small and a large size, fitted to latency + bytes / bandwidth (bytes a rank sends).
Returned as {"device": {...Device rates}, "constants": {...CostConstants}, "measured": {...}}.
"""
from __future__ import annotations

import statistics
import time

GEMM_N = {"cpu": 384, "cuda": 8192}
SMALL_BYTES, LARGE_BYTES = 4 * 1024, 8 * 2**20


def _median_time(fn, repeats: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure_compute(device: str = "cpu", repeats: int = 15) -> dict:
    """GEMM rate, attention rate, memory bandwidth and operator overhead of one worker
    (medians: the typical speed while every worker runs, not the best moment)."""
    import torch

    from engine.attention.core import LocalAttention

    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    n = GEMM_N[dev.type]
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    gemm = 2 * n ** 3 / _median_time(lambda: a @ b, repeats, sync)

    batch, seq, heads, dim = 1, 256, 4, 32
    q = torch.randn(batch, seq, heads, dim, device=dev, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(batch, seq, heads, dim, device=dev, dtype=dtype, requires_grad=True) for _ in range(2))
    core = LocalAttention()
    attention_flops = 3 * 2 * batch * seq * seq * heads * dim     # causal fwd = 2·b·s²·h·d; x3 fwd+bwd
    attention = attention_flops / _median_time(lambda: core(q, k, v).sum().backward(), repeats, sync)

    src = torch.ones(16 * 2**20 // 4, device=dev)
    dst = torch.empty_like(src)       # preallocated: a fresh buffer would time page faults
    copy_rate = 2 * src.nbytes / _median_time(lambda: dst.copy_(src), repeats, sync)

    x = torch.ones(16, device=dev, requires_grad=True)
    ops = 200
    def small_ops():                 # 200 forward muls and their 200 backward muls
        y = x
        for _ in range(ops):
            y = y * 1.0001
        y.sum().backward()
    overhead = _median_time(small_ops, repeats, sync) / (2 * ops)
    return {"gemm_flops": gemm, "attention_flops": attention, "memory_bytes_per_s": copy_rate,
            "op_overhead_s": overhead}


def measure_collectives(group=None, device: str = "cpu", repeats: int = 15) -> dict:
    """Median seconds of an all-to-all and an all-reduce at a small and a large size, on the
    default group (or `group`), run by every rank of it."""
    import torch
    import torch.distributed as dist

    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    out = {}
    for nbytes in (SMALL_BYTES, LARGE_BYTES):
        x = torch.ones(nbytes // 4, device=dev)
        y = torch.empty_like(x)
        dist.barrier(group)
        out[f"a2a_{nbytes}"] = _median_time(lambda: dist.all_to_all_single(y, x, group=group), repeats, sync)
        dist.barrier(group)
        out[f"allreduce_{nbytes}"] = _median_time(lambda: dist.all_reduce(x, group=group), repeats, sync)
    return out


def measure_rank(rank: int, world: int, device: str = "cpu") -> dict:
    """Everything calibration measures, taken on every rank at once (the conditions of a
    training run: all workers busy); call on each rank of an initialised process group."""
    import torch.distributed as dist

    dist.barrier()
    compute = measure_compute(device)
    return {**compute, **measure_collectives(device=device)}


def _fit(small_t: float, large_t: float, small_sent: float, large_sent: float) -> tuple[float, float]:
    """latency + sent / bandwidth through the two points."""
    bandwidth = (large_sent - small_sent) / max(large_t - small_t, 1e-9)
    return max(small_t - small_sent / bandwidth, 0.0), bandwidth


def summarize_measurements(samples: list[dict], world: int) -> dict:
    """Device rates and cost constants from `measure_rank` results (medians over samples)."""
    med = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
    sent = lambda kind, n: n * (world - 1) / world * (2 if kind == "allreduce" else 1)  # noqa: E731
    fitted = {}
    for kind in ("a2a", "allreduce"):
        latency, bandwidth = _fit(med[f"{kind}_{SMALL_BYTES}"], med[f"{kind}_{LARGE_BYTES}"],
                                  sent(kind, SMALL_BYTES), sent(kind, LARGE_BYTES))
        fitted[f"{kind}_latency_s"], fitted[f"{kind}_bytes_per_s"] = latency, bandwidth
    link = min(fitted["a2a_bytes_per_s"], fitted["allreduce_bytes_per_s"])
    return {
        "device": {"peak_flops": med["gemm_flops"], "hbm_bytes_per_s": med["memory_bytes_per_s"],
                   "intra_node_bytes_per_s": link, "inter_node_bytes_per_s": link},
        "constants": {"gemm_efficiency": 1.0, "memory_efficiency": 1.0, "link_efficiency": 1.0,
                      "attention_efficiency": med["attention_flops"] / med["gemm_flops"],
                      "attention_half_block": 0,
                      "collective_latency_s": fitted["allreduce_latency_s"],
                      "a2a_peer_latency_s": fitted["a2a_latency_s"] / 2,
                      "op_overhead_s": med["op_overhead_s"]},
        "measured": {**med, **fitted},
    }


def _calibration_worker(rank: int, world: int, device: str, rounds: int) -> list[dict]:
    return [measure_rank(rank, world, device) for _ in range(rounds)]


def calibrate(device: str = "cpu", progress: bool = False, world: int = 2, rounds: int = 3) -> dict:
    """Measured device rates and cost constants (module docstring), on `world` gloo ranks."""
    from engine.testing.multiprocess import run_distributed

    if device == "cuda":
        raise NotImplementedError("NCCL calibration (one process per GPU) is not wired up yet; "
                                  "use the datasheet table (omit --calibrate) on GPUs")
    if progress:
        print(f"calibrating on {world} gloo ranks: GEMM, attention, memory, operator and "
              "collective rates ...", flush=True)
    per_rank = run_distributed(_calibration_worker, world, device, rounds, timeout_s=600)
    return summarize_measurements([s for rank in per_rank for s in rank], world)
