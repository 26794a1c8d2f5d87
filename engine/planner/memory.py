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
  exchange buffers of a MoE layer; without recompute those buffers alone), or the loss
  backward's logit gradient and fp32 softmax slice on the last stage (whichever is
  larger: the loss backward ends before the first layer is re-run), and at pp > 1 the
  receive buffers posted one compute ahead (an input, a gradient, or both). The optimizer
  step runs after the activations are freed; its working memory (`optimizer_step_bytes`)
  is the grad norm's partial sums or AdamW's one scratch chunk. The activation term is the
  larger of the two peaks.
The dispatcher's rows (inside activations) use the expected routing (balanced: every rank
receives the rows it sends); the worst case sends every token of the dispatch group to
this rank's experts (dropless) or fills every local expert to capacity (capacity factor).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

from engine.config.model import ModelConfig
from engine.parallel.config import ParallelConfig
from engine.config.train import TrainConfig

from .activations import (DispatchRows, MicroBatchShape, dispatcher_buffer_bytes, embedding_bytes,
                          head_bytes, layer_bytes, loss_slice_bytes, loss_working_bytes, rematerialised_bytes,
                          routed_bytes)
from .schedule_memory import in_flight_per_chunk, schedule_name
from .shards import (ChunkKinds, ParamCount, kind_layer_id, largest_params, rank_chunks, rank_params,
                     summarize)

FP32 = 4
FP64 = 8
ADAM_MOMENTS = 2
BUCKET_BYTES = 25 * 2**20     # engine.optim.buckets.DEFAULT_BUCKET_BYTES (fp32 gradient)
NORM_CHUNK = 4096             # engine.optim.clip.NORM_CHUNK
ADAM_CHUNK_ELEMS = 1 << 20    # engine.optim.adamw.CHUNK_ELEMS


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


def dispatch_rows(cfg: ModelConfig, p: ParallelConfig, sp_tokens: int, worst: bool,
                  dispatcher: str = "alltoall") -> DispatchRows:
    """Rows of one MoE layer on one rank for one micro-batch (see the module docstring)."""
    moe = cfg.moe
    local_experts = moe.num_experts // p.ep
    group = p.ep * p.etp
    if moe.capacity_factor is None:
        assigned = sp_tokens * moe.top_k
        at_experts = (group * sp_tokens * min(moe.top_k, local_experts) if worst
                      else p.etp * assigned)
        full = None
    else:
        capacity = math.ceil(sp_tokens * moe.top_k / moe.num_experts * moe.capacity_factor)
        kept = moe.num_experts * capacity
        assigned = kept if moe.pad_to_capacity else min(sp_tokens * moe.top_k, kept)
        full = group * local_experts * capacity
        at_experts = full if (worst or moe.pad_to_capacity) else p.etp * assigned
    if dispatcher == "allgather":
        # Static shapes, no host read (engine/moe/dispatcher_allgather.py): the permuted
        # buffer, the expert internals and the combine keep a row for every slot the group
        # gathered, whatever the routing; only pad-to-capacity cuts them to the local ones.
        rows = full if moe.pad_to_capacity else group * assigned
        return DispatchRows(rows, rows, gathered=group * sp_tokens)
    return DispatchRows(assigned, at_experts)


def _kind_id(cfg: ModelConfig, is_moe: bool) -> int:
    """A layer id of that kind: layer costs depend on the layer only through it."""
    return kind_layer_id(cfg, is_moe)


def _microbatch(p: ParallelConfig, train: TrainConfig) -> MicroBatchShape:
    return MicroBatchShape(batch=train.micro_batch_size, seq_local=train.seq_len // p.cp, tp=p.tp,
                           act_bytes=2 if train.precision == "bf16" else FP32, cp_a2a=p.cp_a2a_group_size)


class _LayerFigures:
    """Per-layer-kind byte counts of one (layout, micro-batch, recompute, routing): computed
    once, then every rank's chunks are sums of them."""

    def __init__(self, cfg: ModelConfig, p: ParallelConfig, train: TrainConfig, rows: DispatchRows):
        mb = _microbatch(p, train)
        mode, dense_id, moe_id = train.recompute, _kind_id(cfg, False), _kind_id(cfg, True)
        self.saved = {False: layer_bytes(cfg, dense_id, mb, rows, p.etp, mode),
                      True: layer_bytes(cfg, moe_id, mb, rows, p.etp, mode)}
        exchange = dispatcher_buffer_bytes(cfg, mb, rows, p.etp)
        self.remat = {False: rematerialised_bytes(cfg, dense_id, mb, rows, p.etp, mode),
                      True: rematerialised_bytes(cfg, moe_id, mb, rows, p.etp, mode) + exchange}
        self.routed = routed_bytes(cfg, mb, rows, p.etp) if mode in ("none", "selective") else 0
        self.exchange = exchange
        self.embedding = embedding_bytes(mb)
        self.head = head_bytes(cfg, mb)
        # The pipeline executor holds a chunk's output until its backward (and sends it).
        self.chunk_output = mb.act_bytes * mb.sp_tokens * cfg.hidden_size
        # the loss backward: the logits' gradient and one fp32 softmax slice
        self.logits = loss_working_bytes(cfg, mb)
        self.loss_slice = loss_slice_bytes(cfg, mb)

    def chunk_layers(self, kinds: ChunkKinds) -> int:
        return kinds.dense * self.saved[False] + kinds.moe * self.saved[True]

    def chunk(self, kinds: ChunkKinds) -> int:
        total = self.chunk_layers(kinds) + (self.embedding if kinds.first else 0)
        return total + (self.head if kinds.last else self.chunk_output)

    def working(self, summary: ChunkKinds) -> int:
        """Memory beyond the saved activations at the rank's peak (module docstring): the
        loss backward finishes (its gradients freed) before any layer is re-run."""
        remat = max(self.remat[False] if summary.dense else 0, self.remat[True] if summary.moe else 0)
        return max(remat, self.logits if summary.last else 0)


def optimizer_step_bytes(count: ParamCount, largest: ParamCount, p: ParallelConfig, zero1: bool) -> int:
    """Working memory of the optimizer step, as the engine runs it on every device: the grad
    norm's partial sums, one fp32 per NORM_CHUNK owned elements, alive with their fp64 copy
    and its square (engine/optim/clip.py: 4 + 4 + 8 + 8 bytes), then AdamW's one scratch
    buffer of at most ADAM_CHUNK_ELEMS fp32 (engine/optim/adamw.py: every other op is in
    place). Neither grows with the model beyond a few MB per 10^9 owned elements."""
    shards = (p.dp * p.cp, p.edp) if zero1 else (1, 1)
    bucket, owned_total = 0, 0
    for total, biggest, shard in zip((count.dense, count.expert), (largest.dense, largest.expert), shards):
        bucket = max(bucket, math.ceil(min(total, max(BUCKET_BYTES // FP32, biggest)) / shard))
        owned_total += math.ceil(total / shard)
    norm = (2 * FP32 + 2 * FP64) * math.ceil(owned_total / NORM_CHUNK)
    return max(norm, FP32 * min(ADAM_CHUNK_ELEMS, bucket))


def _activations(figures: _LayerFigures, p, train, kinds: tuple[ChunkKinds, ...], pp_rank,
                 summary: ChunkKinds | None = None) -> tuple[int, int, dict]:
    """(bytes kept for backward plus working memory, of which dispatcher rows, parts) of PP
    rank `pp_rank`, at its forward/backward peak."""
    m = train.num_microbatches(p.dp)
    held = in_flight_per_chunk(schedule_name(train.pipeline_schedule, p.vpp), p.pp, p.vpp, m, pp_rank)
    # micro-batches held x what each chunk keeps: the held-weighted chunk composition
    weighted = ChunkKinds(sum(c * k.dense for c, k in zip(held, kinds)),
                          sum(c * k.moe for c, k in zip(held, kinds)), False, False)
    ends = sum(c * ((figures.embedding if k.first else 0) + (figures.head if k.last else figures.chunk_output))
               for c, k in zip(held, kinds) if k.first or k.last) + figures.chunk_output * sum(
                   c for c, k in zip(held, kinds) if not (k.first or k.last))
    saved = figures.chunk_layers(weighted) + ends
    dispatcher = weighted.moe * figures.routed
    summary = summary or summarize(kinds)
    if summary.moe:
        dispatcher += figures.exchange
    # The receives posted one compute ahead (engine/pipeline/schedules.py `_with_comm`) are
    # allocated already: the next forward's input (a chunk after the first) and the next
    # backward's gradient (a chunk before the last).
    receives = any(not k.first for k in kinds) + any(not k.last for k in kinds) if p.pp > 1 else 0
    working = figures.working(summary) + receives * figures.chunk_output
    return saved + working, dispatcher, {"saved": saved, "working": working}


def owned_elements(count: ParamCount, p: ParallelConfig, zero1: bool) -> float:
    """Parameters whose optimizer state this rank holds (ZeRO-1: dense / (dp·cp), experts / edp)."""
    return count.dense / (p.dp * p.cp) + count.expert / p.edp if zero1 else count.total


def _state_bytes(count: ParamCount, p: ParallelConfig, train: TrainConfig) -> tuple[int, int, int]:
    """(params, grads, optimizer) bytes for a rank holding `count` parameters."""
    param_bytes = 2 if train.precision == "bf16" else FP32
    per_owned = FP32 * ADAM_MOMENTS + (FP32 if train.precision == "bf16" else 0)
    return (param_bytes * count.total, FP32 * count.total,
            int(per_owned * owned_elements(count, p, train.zero1)))


def stage_states(cfg: ModelConfig, p: ParallelConfig, train: TrainConfig) -> list[tuple[ParamCount, float]]:
    """(parameters held, optimizer elements owned) of every PP rank."""
    counts = [rank_params(cfg, p, kinds) for kinds in rank_chunks(cfg, p.pp, p.vpp, train.seq_len)]
    return [(count, owned_elements(count, p, train.zero1)) for count in counts]


def state_peak(cfg: ModelConfig, p: ParallelConfig, train: TrainConfig) -> int:
    """The largest params + grads + optimizer of any rank: a lower bound of its memory that
    no micro-batch size or recompute mode changes (the planner prunes with it)."""
    return max(sum(_state_bytes(count, p, train)) for count, _ in stage_states(cfg, p, train))


def _rank_parts(cfg, p, train, kinds, pp_rank, figures, count, largest, summary=None):
    """(params, grads, optimizer, forward/backward activations, dispatcher, parts,
    optimizer-step working memory) of one rank."""
    params, grads, optimizer = _state_bytes(count, p, train)
    step = optimizer_step_bytes(count, largest, p, train.zero1)
    forward_backward, dispatcher, parts = _activations(figures, p, train, kinds, pp_rank, summary)
    return params, grads, optimizer, forward_backward, dispatcher, parts, step


def _rank(cfg, p, train, kinds, pp_rank, expected, worst) -> RoleMemory:
    count, largest = rank_params(cfg, p, kinds), largest_params(cfg, p, kinds)
    params, grads, optimizer, forward_backward, dispatcher, parts, step = _rank_parts(
        cfg, p, train, kinds, pp_rank, expected, count, largest)
    worst_case = forward_backward if worst is expected else _activations(worst, p, train, kinds, pp_rank)[0]
    return RoleMemory(role_name(pp_rank, p.pp), pp_rank, params, grads, optimizer,
                      max(forward_backward, step), dispatcher, max(worst_case, step), count,
                      dict(parts, optimizer_step=step))


def estimate_memory(cfg: ModelConfig, p: ParallelConfig, train: TrainConfig, *,
                    worst_case: bool = True, dispatcher: str = "alltoall") -> MemoryEstimate:
    """Predicted memory of every PP rank of layout `p` (the same on every device), see the
    module docstring. worst_case=False skips the worst-case routing figure (it then equals
    the expected one)."""
    expected = layer_figures(cfg, p, train, dispatcher=dispatcher)
    worst = layer_figures(cfg, p, train, worst=True, dispatcher=dispatcher) if worst_case else expected
    ranks = [_rank(cfg, p, train, kinds, r, expected, worst)
             for r, kinds in enumerate(rank_chunks(cfg, p.pp, p.vpp, train.seq_len))]
    return MemoryEstimate(ranks)


def layer_figures(cfg: ModelConfig, p: ParallelConfig, train: TrainConfig, worst: bool = False,
                  dispatcher: str = "alltoall") -> _LayerFigures:
    """The expected-routing (or worst-case) figures of a layout: they depend on tp, cp, ep,
    etp, the micro-batch size, recompute and the dispatcher only, so the planner computes
    them once per such key."""
    rows = dispatch_rows(cfg, p, _microbatch(p, train).sp_tokens, worst=worst, dispatcher=dispatcher)
    return _LayerFigures(cfg, p, train, rows)


def representative_ranks(rank_kinds: tuple[tuple[ChunkKinds, ...], ...]) -> list[int]:
    """The first PP rank of each distinct chunk composition. Every schedule holds no more
    micro-batches on a later rank than on an earlier one (1F1B: pp - r; interleaved: its
    warm-up falls with r; GPipe: m on all), so among ranks holding the same chunks the
    first has the most memory and the slowest step: the maximum over these ranks is the
    maximum over all."""
    seen, out = set(), []
    for rank, kinds in enumerate(rank_kinds):
        if kinds not in seen:
            seen.add(kinds)
            out.append(rank)
    return out


class RankInfo(NamedTuple):
    """A representative PP rank with what the planner reuses across candidates; `copies`:
    the PP ranks with the same chunk composition (itself included)."""
    rank: int
    kinds: tuple
    summary: ChunkKinds
    count: ParamCount
    largest: ParamCount
    copies: int = 1


def rank_infos(cfg: ModelConfig, p: ParallelConfig, seq_len: int) -> list[RankInfo]:
    rank_kinds = rank_chunks(cfg, p.pp, p.vpp, seq_len)
    return [RankInfo(r, rank_kinds[r], summarize(rank_kinds[r]), rank_params(cfg, p, rank_kinds[r]),
                     largest_params(cfg, p, rank_kinds[r]), rank_kinds.count(rank_kinds[r]))
            for r in representative_ranks(rank_kinds)]


def rank_states(p: ParallelConfig, train: TrainConfig, ranks: list[RankInfo]) -> list[tuple[int, int]]:
    """(params + grads + optimizer, optimizer-step working memory) of each representative
    rank: independent of the micro-batch size and recompute mode."""
    return [(sum(_state_bytes(info.count, p, train)),
             optimizer_step_bytes(info.count, info.largest, p, train.zero1))
            for info in ranks]


def peak_memory(cfg: ModelConfig, p: ParallelConfig, train: TrainConfig, *,
                figures: _LayerFigures | None = None, ranks: list[RankInfo] | None = None,
                states: list[tuple[int, int]] | None = None) -> int:
    """max over ranks of the predicted total (the `estimate_memory(...).peak.total` of the
    expected routing), evaluated on the representative ranks only; `ranks` and `states`
    (rank_infos, rank_states) when the caller keeps them across micro-batch sizes."""
    figures = figures or layer_figures(cfg, p, train)
    ranks = ranks if ranks is not None else rank_infos(cfg, p, train.seq_len)
    states = states if states is not None else rank_states(p, train, ranks)
    best = 0
    for info, (state, step) in zip(ranks, states):
        forward_backward = _activations(figures, p, train, info.kinds, info.rank, info.summary)[0]
        best = max(best, state + max(forward_backward, step))
    return best
