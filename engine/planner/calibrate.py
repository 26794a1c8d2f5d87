"""`foldmoe plan --calibrate`: measure this machine's rates and use them instead of the table.

Measured, per worker (one thread per CPU worker, as `cluster.cpus_per_worker: 1` runs):
- GEMM rate: best 2n^3/t of n x n matmuls (fp32 on CPU, bf16 on GPU); the cost model's
  peak becomes this rate and its GEMM efficiency 1;
- attention rate: the engine's own local attention core (engine/attention/core.py),
  forward + backward, as FLOPs per second of its causal work, at blocks of 256 and of 64
  tokens (the same tokens), fitted to rate(L) = r L / (L + L_half) (CP's zigzag blocks);
- memory bandwidth: bytes read + written by a large tensor copy;
- operator overhead: seconds per small aten op under autograd (forward and backward ops
  of a chain of tiny multiplications), what dominates a small model's step on a CPU;
- optimizer: seconds per element of the grad norm's fp32 partials, the clip scale and the
  chunked AdamW on a flat fp32 range, as the engine's optimizer step runs them;
- collectives: all-to-all and all-reduce on every worker of the machine (gloo on CPU,
  NCCL on GPU: engine/planner/calibrate_ranks.py) at a small and a large size, fitted to
  latency + bytes / bandwidth (bytes a rank sends);
- synchronisation: a collective issued right after a stretch of compute costs more than
  one in a tight loop: the ranks arrive at different times (one was slower or
  descheduled: a CPU shared by the workers and other jobs) and a blocked rank must be
  woken. Measured as [GEMMs, small all-gather] x n minus the GEMMs alone and the
  all-gathers alone, per call, with a few ms of GEMMs between two collectives, and added
  to the collective latency: every synchronous collective of the step pays it (TP's
  gathers and reduce-scatters, the loss's all-reduces, EP's all-to-alls, CP's and PP's
  transfers).
- layer scale (when given the model): one dense and one MoE layer of it forward + backward
  (the engine's modules, one process), measured / modelled: the factor the compute term
  is scaled by (allocation, page faults, autograd bookkeeping that the rates miss).
Returned as {"device": {...Device rates}, "constants": {...CostConstants}, "measured": {...}}.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import replace

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

    dev = _device(device)
    sync = _sync(dev)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    n = GEMM_N[dev.type]
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    gemm = 2 * n ** 3 / _median_time(lambda: a @ b, repeats, sync)

    core = LocalAttention()

    def attention_rate(seq: int, batch: int) -> float:
        heads, dim = 4, 32
        q, k, v = (torch.randn(batch, seq, heads, dim, device=dev, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        flops = 3 * 2 * batch * seq * seq * heads * dim      # causal fwd = 2·b·s²·h·d; x3 fwd+bwd
        return flops / _median_time(lambda: core(q, k, v).sum().backward(), repeats, sync)
    # the same tokens as 1 x 256 and as 4 x 64 blocks: fits rate(L) = r·L / (L + L_half)
    long_rate, short_rate = attention_rate(256, 1), attention_rate(64, 4)
    ratio = min(max(long_rate / short_rate, 1.0), 3.9)
    half_block = 256 * (ratio - 1) / (4 - ratio)
    attention = long_rate * (256 + half_block) / 256

    src = torch.ones(128 * 2**20 // 4, device=dev)   # far beyond the caches
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
    return {"gemm_flops": gemm, "attention_flops": attention, "attention_half_block": half_block,
            "memory_bytes_per_s": copy_rate,
            "op_overhead_s": overhead, "optimizer_s_per_elem": _optimizer_rate(dev, repeats, sync)}


def _optimizer_rate(dev, repeats: int, sync) -> float:
    """Seconds per element of the engine's optimizer step on this device: the grad norm's
    fp32 partial sums, the clip scale and the chunked AdamW on flat fp32 ranges, as
    FoldedOptimizer runs them (engine/optim/clip.py, adamw.py)."""
    import torch

    from engine.optim.adamw import chunked_adamw_
    from engine.optim.clip import chunk_norms

    n = 1 << 23                      # 4 x 32 MiB: out of the caches, as a model's buffers are
    param, grad, m, v = (torch.rand(n, device=dev) for _ in range(4))

    def update():
        chunk_norms(grad).double().square().sum()
        grad.mul_(1.0)
        chunked_adamw_([param], [grad], [m], [v], step=1, lr=1e-4, beta1=0.9, beta2=0.95,
                       eps=1e-8, weight_decay=0.1)
    return _median_time(update, max(3, repeats // 3), sync) / n


def measure_layer_scale(cfg, train, machine, repeats: int = 5) -> float:
    """measured / modelled forward + backward time of one dense and one MoE layer of `cfg`
    (one micro-batch, one process, the engine's own modules): what the engine's layers
    really cost here beyond the measured rates. Only for models small enough to run here."""
    import torch

    from engine.attention.core import LocalAttention
    from engine.models.init import init_weights
    from engine.models.transformer import MoETransformer
    from engine.parallel.config import ParallelConfig

    from .cost import _layer
    from .shards import kind_layer_id

    kinds = sorted({cfg.is_moe_layer(i) for i in range(cfg.num_layers)})
    layer_ids = [kind_layer_id(cfg, moe) for moe in kinds]
    model = MoETransformer(cfg, layer_ids, first_stage=False, last_stage=False)
    init_weights(model, cfg, 0)
    for block in model.layers.values():
        block.attention.core = LocalAttention()
    model.train()
    model.set_recompute(train.recompute)
    b, s = train.micro_batch_size, train.seq_len
    x = torch.randn(b, s, cfg.hidden_size, requires_grad=True)
    positions = torch.arange(s).expand(b, s)
    measured = _median_time(lambda: model(x, positions).square().mean().backward(), repeats, lambda: None)
    one = ParallelConfig(world_size=1)
    unscaled = machine.__class__(machine.device, machine.gpus_per_node,
                                 replace(machine.constants, compute_scale=1.0))
    modelled = sum(_layer(cfg, moe, one, train, unscaled, "local")["compute"] for moe in kinds)
    return measured / modelled


def _device(device: str):
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")


def _sync(dev):
    import torch

    return (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)


def measure_collectives(group=None, device: str = "cpu", repeats: int = 15) -> dict:
    """Median seconds of an all-to-all and an all-reduce at a small and a large size, and
    the synchronisation wait per collective after compute (module docstring), on the
    default group (or `group`) of the backend the process group runs (gloo or NCCL),
    with tensors on `device`; run by every rank of the group."""
    import torch
    import torch.distributed as dist

    dev = _device(device)
    sync = _sync(dev)
    out = {}
    for nbytes in (SMALL_BYTES, LARGE_BYTES):
        x = torch.ones(nbytes // 4, device=dev)
        y = torch.empty_like(x)
        dist.barrier(group)
        out[f"a2a_{nbytes}"] = _median_time(lambda: dist.all_to_all_single(y, x, group=group), repeats, sync)
        dist.barrier(group)
        out[f"allreduce_{nbytes}"] = _median_time(lambda: dist.all_reduce(x, group=group), repeats, sync)
    out["sync_wait_s"] = _sync_wait(group, dev, repeats, sync)
    return out


SYNC_CALLS = 20
SYNC_STRETCH = 16            # GEMMs between two collectives (~3 ms on this CPU)


def _sync_wait(group, dev, repeats: int, sync) -> float:
    """Per call: [SYNC_STRETCH GEMMs, small all-gather] x SYNC_CALLS minus the GEMMs alone
    and the all-gathers alone; the three timed back to back in each repeat (so a load
    change hits all three), median over the repeats. The stretch (a few ms on a CPU) is
    about the compute between two TP collectives of a model small enough to run here."""
    import torch
    import torch.distributed as dist

    n = GEMM_N[dev.type] // 2
    a = torch.randn(n, n, device=dev)
    x = torch.ones(SMALL_BYTES // 4, device=dev)
    y = x.new_empty(x.numel() * dist.get_world_size(group))

    def timed(fn) -> float:
        dist.barrier(group)
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    def gathers():
        for _ in range(SYNC_CALLS):
            dist.all_gather_single(y, x, group=group)

    def gemms():
        for _ in range(SYNC_CALLS * SYNC_STRETCH):
            a @ a

    def both():
        for _ in range(SYNC_CALLS):
            for _ in range(SYNC_STRETCH):
                a @ a
            dist.all_gather_single(y, x, group=group)
    both()
    extras = [timed(both) - timed(gemms) - timed(gathers) for _ in range(repeats)]
    return max(statistics.median(extras), 0.0) / SYNC_CALLS


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


def _best(key: str, values: list[float]) -> float:
    """The least disturbed sample: the highest rate, the shortest time or cost."""
    return max(values) if key.endswith(("_flops", "_bytes_per_s")) else min(values)


def summarize_measurements(samples: list[dict], world: int, stat: str = "median",
                           device: str = "cpu") -> dict:
    """Device rates and cost constants from `measure_rank` results: medians over samples, or
    with stat="best" the least disturbed sample of each figure (a shared, loaded machine).
    On a GPU the measured link is the node's NVLink only: the network figure is left to
    the datasheet row (see `orchestrator/planning.py machine_for`)."""
    from .cost import CostConstants

    pick = (lambda key, values: statistics.median(values)) if stat == "median" else _best
    med = {key: pick(key, [s[key] for s in samples]) for key in samples[0]}
    sent = lambda kind, n: n * (world - 1) / world * (2 if kind == "allreduce" else 1)  # noqa: E731
    fitted = {}
    for kind in ("a2a", "allreduce"):
        latency, bandwidth = _fit(med[f"{kind}_{SMALL_BYTES}"], med[f"{kind}_{LARGE_BYTES}"],
                                  sent(kind, SMALL_BYTES), sent(kind, LARGE_BYTES))
        fitted[f"{kind}_latency_s"], fitted[f"{kind}_bytes_per_s"] = latency, bandwidth
    link = min(fitted["a2a_bytes_per_s"], fitted["allreduce_bytes_per_s"])
    rates = {"peak_flops": med["gemm_flops"], "hbm_bytes_per_s": med["memory_bytes_per_s"],
             "intra_node_bytes_per_s": link}
    if device != "cuda":
        rates["inter_node_bytes_per_s"] = link     # CPU workers share one host
    sync_wait = med.get("sync_wait_s", 0.0)
    return {
        "device": rates,
        # gemm_half_size on CPU 0: the measured rate and the layer scale already are this
        # machine's rates at the model's shapes (no tiles and waves to fill); on a GPU the
        # tile model stays (the measured n = 8192 GEMM fills its tiles)
        "constants": {"gemm_efficiency": 1.0, "memory_efficiency": 1.0,
                      "gemm_half_size": CostConstants().gemm_half_size if device == "cuda" else 0,
                      "link_efficiency": 1.0,
                      "attention_efficiency": med["attention_flops"] / med["gemm_flops"],
                      "attention_half_block": int(round(med["attention_half_block"])),
                      "collective_latency_s": fitted["allreduce_latency_s"] + sync_wait,
                      "a2a_peer_latency_s": fitted["a2a_latency_s"] / 2,
                      "op_overhead_s": med["op_overhead_s"],
                      "optimizer_s_per_elem": med["optimizer_s_per_elem"]},
        "measured": {**med, **fitted},
    }


LAYER_SCALE_MAX_PARAMS = 300_000_000   # one dense + one MoE layer must run in seconds here


def _calibration_worker(rank: int, world: int, device: str, rounds: int, model=None, train=None
                        ) -> list[dict]:
    from .cost import CostConstants, Machine
    from .devices import DEVICES

    out = []
    for _ in range(rounds):
        sample = measure_rank(rank, world, device)
        if model is not None:
            rates = summarize_measurements([sample], world, device=device)
            machine = Machine(DEVICES["cpu"].with_rates(**rates["device"]), world,
                              CostConstants(**rates["constants"]))
            sample["compute_scale"] = measure_layer_scale(model, train, machine)
        out.append(sample)
    return out


def _layer_pair_params(model) -> int:
    from .shards import kind_layer_id, layer_params
    from engine.parallel.config import ParallelConfig

    one = ParallelConfig(world_size=1)
    return sum(layer_params(model, i, one).total for i in {kind_layer_id(model, False), kind_layer_id(model, True)})


def calibrate(device: str = "cpu", progress: bool = False, world: int = 2, rounds: int = 3,
              model=None, train=None) -> dict:
    """Measured device rates and cost constants (module docstring) on this machine's workers
    (calibrate_ranks.py: `world` gloo processes on CPU, every GPU of the node with NCCL on
    "cuda"); with `model` and `train` (small enough to run here, CPU only) also the engine's
    layer scale. Raises CalibrationUnavailable when the device is not on this machine."""
    from .calibrate_ranks import backend_for, calibration_world, run_ranks

    world = calibration_world(device, world)
    if device == "cuda" or (model is not None and _layer_pair_params(model) > LAYER_SCALE_MAX_PARAMS):
        model = train = None        # rates only: the layer scale runs the model's layers on the CPU
    if progress:
        print(f"calibrating on {world} {backend_for(device)} ranks: GEMM, attention, memory, operator, "
              f"collective and synchronisation rates{', layer scale' if model is not None else ''} ...",
              flush=True)
    per_rank = run_ranks(_calibration_worker, world, device, rounds, model, train, timeout_s=900)
    samples = [s for rank in per_rank for s in rank]
    out = summarize_measurements([{k: v for k, v in s.items() if k != "compute_scale"} for s in samples],
                                 world, device=device)
    if model is not None:
        out["constants"]["compute_scale"] = statistics.median(s["compute_scale"] for s in samples)
    return out
