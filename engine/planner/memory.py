"""The memory model: predicted bytes per rank role (pipeline stage, first / last) of a
layout, before anything runs.

Per PP rank (all ranks of one stage hold the same shapes):
- params: this rank's shards (engine/planner/shards.py) in the model dtype;
- grads: fp32 main grads of every local parameter (engine/optim/flat_bucket.py; ZeRO-1
  shards the optimizer state, not the gradient buffer);
- optimizer: Adam's two fp32 moments plus an fp32 master copy when the model is bf16 (fp32
  params are their own master), of the owned range: everything without ZeRO-1, 1/(dp·cp)
  of the dense and 1/edp of the expert parameters with it (Rajbhandari et al. 1910.02054);
- activations: what each chunk keeps for backward (engine/planner/activations.py) times
  the micro-batches the pipeline schedule holds in flight on this rank, plus working
  memory: one layer re-materialised under full / remat-aware recompute (with the token
  exchange buffers of a MoE layer; without recompute those buffers alone), or the head's
  logits and the two fp32 gradients of the loss backward on the last stage (whichever is
  larger: the loss backward ends before the first layer is re-run). The optimizer
  step runs after the activations are freed; its working memory (`optimizer_step_bytes`)
  is the grad-norm's fp64 copy of one bucket and AdamW's temporaries. The activation
  term is the larger of the two peaks.
The dispatcher's rows (inside activations) use the expected routing (balanced: every rank
receives the rows it sends); the worst case sends every token of the dispatch group to
this rank's experts (dropless) or fills every local expert to capacity (capacity factor).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.models.config import ModelConfig
from engine.parallel.config import ParallelConfig
from engine.train.config import TrainConfig

from .activations import (DispatchRows, MicroBatchShape, dispatcher_buffer_bytes, embedding_bytes,
                          head_bytes, layer_bytes, rematerialised_bytes, routed_bytes)
from .schedule_memory import in_flight_per_chunk, schedule_name
from .shards import ParamCount, chunk_layers, largest_params, stage_params

FP32 = 4
FP64 = 8
ADAM_MOMENTS = 2
BUCKET_BYTES = 25 * 2**20     # engine.optim.buckets.DEFAULT_BUCKET_BYTES (fp32 gradient)


@dataclass(frozen=True)
class RoleMemory:
    """Predicted bytes of one rank role; `activations` includes `dispatcher`."""
    role: str
    pp_rank: int
    params: int
    grads: int
    optimizer: int
    activations: int
    dispatcher: int
    activations_worst: int
    param_count: ParamCount = field(default_factory=ParamCount)
    breakdown: dict = field(default_factory=dict)   # saved, working, optimizer_step (bytes)

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations

    @property
    def total_worst(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations_worst

    def terms(self) -> dict[str, int]:
        return {"params": self.params, "grads": self.grads, "optimizer": self.optimizer,
                "activations": self.activations}

    def as_dict(self) -> dict:
        return {"role": self.role, "pp_rank": self.pp_rank, "params": self.params,
                "grads": self.grads, "optimizer": self.optimizer, "activations": self.activations,
                "dispatcher": self.dispatcher, "total": self.total,
                "total_worst_case_routing": self.total_worst,
                "param_count": {"dense": self.param_count.dense, "expert": self.param_count.expert},
                "activation_breakdown": dict(self.breakdown)}


@dataclass(frozen=True)
class MemoryEstimate:
    ranks: list[RoleMemory]

    @property
    def peak(self) -> RoleMemory:
        return max(self.ranks, key=lambda r: r.total)


def role_name(pp_rank: int, pp: int) -> str:
    ends = [name for name, cond in (("first", pp_rank == 0), ("last", pp_rank == pp - 1)) if cond]
    return f"stage {pp_rank}" + (f" ({'+'.join(ends)})" if ends else "")


def dispatch_rows(cfg: ModelConfig, p: ParallelConfig, sp_tokens: int, worst: bool) -> DispatchRows:
    """Rows of one MoE layer on one rank for one micro-batch (see the module docstring)."""
    moe = cfg.moe
    local_experts = moe.num_experts // p.ep
    group = p.ep * p.etp
    if moe.capacity_factor is None:
        assigned = sp_tokens * moe.top_k
        at_experts = (group * sp_tokens * min(moe.top_k, local_experts) if worst
                      else p.etp * assigned)
    else:
        capacity = math.ceil(sp_tokens * moe.top_k / moe.num_experts * moe.capacity_factor)
        kept = moe.num_experts * capacity
        assigned = kept if moe.pad_to_capacity else min(sp_tokens * moe.top_k, kept)
        full = group * local_experts * capacity
        at_experts = full if (worst or moe.pad_to_capacity) else p.etp * assigned
    return DispatchRows(assigned, at_experts)


def _microbatch(p: ParallelConfig, train: TrainConfig) -> MicroBatchShape:
    return MicroBatchShape(batch=train.micro_batch_size, seq_local=train.seq_len // p.cp, tp=p.tp,
                           act_bytes=2 if train.precision == "bf16" else FP32)


def _chunk_bytes(cfg, p, mb, layers, chunk, num_chunks, rows, recompute) -> int:
    total = sum(layer_bytes(cfg, i, mb, rows, p.etp, recompute) for i in layers)
    if chunk == 0:
        total += embedding_bytes(mb)
    if chunk == num_chunks - 1:
        total += head_bytes(cfg, mb)
    else:
        # The pipeline executor holds the chunk's output until its backward (and sends it).
        total += mb.act_bytes * mb.sp_tokens * cfg.hidden_size
    return total


def _working_bytes(cfg, p, mb, chunks, pp_rank, rows, recompute) -> int:
    """Memory beyond the saved activations at the rank's peak (module docstring)."""
    own = [i for v in range(p.vpp) for i in chunks[v * p.pp + pp_rank]]
    exchange = dispatcher_buffer_bytes(cfg, mb, rows, p.etp)
    rematerialised = max(rematerialised_bytes(cfg, i, mb, rows, p.etp, recompute)
                         + (exchange if cfg.is_moe_layer(i) else 0) for i in own)
    logits = 0
    if pp_rank == p.pp - 1:
        # logits (model dtype) + fp32 grads of the log-probabilities and of the logits
        logits = (mb.act_bytes + 2 * FP32) * mb.tokens * (cfg.vocab_size // p.tp)
    # The loss backward finishes (its gradients freed) before any layer is re-run.
    return max(rematerialised, logits)


def optimizer_step_bytes(count: ParamCount, largest: ParamCount, p: ParallelConfig,
                         zero1: bool, foreach: bool) -> int:
    """Working memory of the optimizer step: the grad-norm's fp64 copy of one bucket's owned
    gradient (engine/optim/clip.py), then AdamW's temporaries. torch's AdamW runs the
    foreach kernels on CUDA: sqrt(exp_avg_sq) of every owned element at once (fp32); on
    CPU the per-tensor loop: sqrt and its quotient for one range while the previous
    range's denominator is still bound, about 3 fp32 copies of the largest range."""
    shards = (p.dp * p.cp, p.edp) if zero1 else (1, 1)
    bucket, owned_total = 0, 0
    for total, biggest, shard in zip((count.dense, count.expert), (largest.dense, largest.expert), shards):
        bucket = max(bucket, math.ceil(min(total, max(BUCKET_BYTES // FP32, biggest)) / shard))
        owned_total += math.ceil(total / shard)
    adam = FP32 * owned_total if foreach else 3 * FP32 * bucket
    return max(FP64 * bucket, adam)


def _activations(cfg, p, train, chunks, pp_rank, rows) -> tuple[int, int, dict]:
    """(bytes kept for backward plus working memory, of which dispatcher rows, parts) of PP
    rank `pp_rank`, at its forward/backward peak."""
    mb, m = _microbatch(p, train), train.num_microbatches(p.dp)
    held = in_flight_per_chunk(schedule_name(train.pipeline_schedule, p.vpp), p.pp, p.vpp, m, pp_rank)
    saved = dispatcher = 0
    for v, count in enumerate(held):
        chunk = v * p.pp + pp_rank
        saved += count * _chunk_bytes(cfg, p, mb, chunks[chunk], chunk, len(chunks), rows,
                                      train.recompute)
        if train.recompute in ("none", "selective"):
            moe_layers = sum(cfg.is_moe_layer(i) for i in chunks[chunk])
            dispatcher += count * moe_layers * routed_bytes(cfg, mb, rows, p.etp)
    working = _working_bytes(cfg, p, mb, chunks, pp_rank, rows, train.recompute)
    if any(cfg.is_moe_layer(i) for v in range(p.vpp) for i in chunks[v * p.pp + pp_rank]):
        dispatcher += dispatcher_buffer_bytes(cfg, mb, rows, p.etp)
    return saved + working, dispatcher, {"saved": saved, "working": working}


def _state_bytes(count: ParamCount, p: ParallelConfig, train: TrainConfig) -> tuple[int, int, int]:
    """(params, grads, optimizer) bytes for a rank holding `count` parameters."""
    param_bytes = 2 if train.precision == "bf16" else FP32
    per_owned = FP32 * ADAM_MOMENTS + (FP32 if train.precision == "bf16" else 0)
    if train.zero1:
        owned = count.dense / (p.dp * p.cp) + count.expert / p.edp
    else:
        owned = count.total
    return param_bytes * count.total, FP32 * count.total, int(per_owned * owned)


def estimate_memory(cfg: ModelConfig, p: ParallelConfig, train: TrainConfig, *,
                    device: str = "cuda") -> MemoryEstimate:
    """Predicted memory of every PP rank of layout `p` on `device` ("cuda" or "cpu": which
    AdamW implementation torch picks), see the module docstring."""
    chunks = chunk_layers(cfg, p, train.seq_len)
    mb = _microbatch(p, train)
    expected = dispatch_rows(cfg, p, mb.sp_tokens, worst=False)
    worst = dispatch_rows(cfg, p, mb.sp_tokens, worst=True)
    ranks = []
    for pp_rank in range(p.pp):
        count = stage_params(cfg, p, chunks, pp_rank)
        params, grads, optimizer = _state_bytes(count, p, train)
        step = optimizer_step_bytes(count, largest_params(cfg, p, chunks, pp_rank), p, train.zero1,
                                    foreach=device == "cuda")
        forward_backward, dispatcher, parts = _activations(cfg, p, train, chunks, pp_rank, expected)
        worst_case, _, _ = _activations(cfg, p, train, chunks, pp_rank, worst)
        ranks.append(RoleMemory(role_name(pp_rank, p.pp), pp_rank, params, grads, optimizer,
                                max(forward_backward, step), dispatcher, max(worst_case, step), count,
                                dict(parts, optimizer_step=step)))
    return MemoryEstimate(ranks)
