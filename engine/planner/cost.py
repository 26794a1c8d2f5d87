"""Predicted step time of one folded layout (the planner's cost model; docs/planner.md).

Per micro-batch and layer on one rank (t = b·s/cp tokens, t_sp = t/tp, heads per TP rank):
- GEMMs (projections, FFN, shared experts, router, each routed expert, head) take
  max(2mkn / (peak·gemm_eff), bytes / (HBM·mem_eff)) forward and three times that for
  forward + backward: a grouped expert GEMM with few rows per expert is memory-bound on
  its weights, which is what slows fine-grained experts down;
- the attention core: 2·b·(s/cp)·s·n_q·d forward FLOPs (causal, zigzag-balanced), three
  times for forward + backward, at peak·attention_eff;
- elementwise work: `elementwise_passes` HBM passes over the activation bytes the layer
  writes, kept for backward or not (engine/planner/activations.py); plus `op_overhead_s` per operator (counted once
  with a dispatch mode on the engine's layers: OPS);
- recompute re-runs the forward of what it drops (full: the layer; selective: the core;
  remat-aware: all but the core), with its collectives.
Communication (engine/planner/comm_model.py) is exposed as the engine runs it: TP and EP
collectives are synchronous; PP p2p is too in 1F1B / GPipe, while the interleaved schedule
hides each transfer behind the other compute of its (F, B) pair and exposes only the
pipeline's fill and drain, 2 (pp·vpp - 1) transfers; the CP ring overlaps the attention
blocks, the CP all-to-all (cp_mode a2a, hybrid) is synchronous, and the CP core's own
copies and fp32 merges count at HBM speed (engine/planner/cp_traffic.py); the DP
reduction overlaps the last micro-batch's backward when train.overlap_grad_reduce.
Step = m·(slowest stage per micro-batch) + bubble + exposed DP + optimizer update, the
bubble (sum of the other stages' times per micro-batch)/vpp: (pp - 1)/vpp micro-batch
times for balanced stages (Narayanan et al. 2021), less when the stages are not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.metrics.flops import model_flops_per_iteration
from engine.config.model import ModelConfig
from engine.parallel.config import ParallelConfig
from engine.config.train import TrainConfig

from .activations import LOSS_ROW_CHUNK_ELEMS, MicroBatchShape, layer_bytes, unkept_bytes
from .comm_model import Link, a2a_bytes, allgather_dispatch_bytes, dp_bytes, tp_collective_bytes
from .cp_traffic import CpShape, cp_comm_bytes, cp_hbm_bytes, cp_shape
from .devices import Device
from .memory import RankInfo, dispatch_rows, owned_elements, rank_infos
from .shards import kind_layer_id, local_kv_heads

# aten operators per layer, forward + backward (one process, engine/models + engine/moe,
# counted with a TorchDispatchMode; the grouped-GEMM experts add none per local expert).
# "ends": embedding + head + loss at one loss slice; 51 before the chunked loss, which
# added 44 (tp = 1 ran F.cross_entropy's few fused operators).
OPS = {"dense_layer": 260, "moe_layer": 347, "shared": 47, "ends": 95}
LOSS_ALL_REDUCES = 2       # engine/tensor_parallel/cross_entropy.py: 3 fp32 per token, forward only
LOSS_OPS_PER_SLICE = 10    # its aten operators per row slice after the first, forward + backward
ADAM_BYTES_PER_ELEM = 30   # read grad, master, 2 moments; write master, 2 moments, param


@dataclass(frozen=True)
class CostConstants:
    """Achievable fractions of the device figures; one set for every GPU case (docs/planner.md)."""
    gemm_efficiency: float = 0.80
    gemm_half_size: int = 128              # rows / columns at which a GEMM's rate halves (one tile)
    attention_efficiency: float = 0.55
    attention_half_block: int = 256        # block length (tokens) at which it halves
    memory_efficiency: float = 0.80
    link_efficiency: float = 0.80
    collective_latency_s: float = 15e-6
    a2a_peer_latency_s: float = 4e-6
    op_overhead_s: float = 2e-6
    elementwise_passes: float = 4.0
    # Seconds per owned element of the optimizer step (AdamW + grad-norm); None: stream
    # ADAM_BYTES_PER_ELEM at HBM speed (the engine's chunked AdamW keeps a chunk's operands
    # in cache across its eight ops; engine/optim/adamw.py); calibration measures it.
    optimizer_s_per_elem: float | None = None
    # Measured / modelled time of the engine's own layers on this machine (calibration only:
    # allocation, page faults and autograd bookkeeping that the rates above do not see).
    compute_scale: float = 1.0


@dataclass(frozen=True)
class Machine:
    device: Device
    gpus_per_node: int = 8
    constants: CostConstants = field(default_factory=CostConstants)

    @property
    def gemm_rate(self) -> float:
        return self.device.peak_flops * self.constants.gemm_efficiency

    @property
    def attention_rate(self) -> float:
        return self.device.peak_flops * self.constants.attention_efficiency

    @property
    def memory_rate(self) -> float:
        return self.device.hbm_bytes_per_s * self.constants.memory_efficiency

    @property
    def link(self) -> Link:
        eff = self.constants.link_efficiency
        return Link(self.device.intra_node_bytes_per_s * eff, self.device.inter_node_bytes_per_s * eff,
                    self.gpus_per_node)


@dataclass(frozen=True)
class StepEstimate:
    step_time_s: float
    mfu: float
    tflops_per_gpu: float
    breakdown: dict   # seconds per step: compute, tp, cp, ep, pp, bubble, dp, optimizer


def _gemm(m: float, k: float, n: float, e: int, mach: Machine) -> float:
    """Forward time of one [m, k] x [k, n] GEMM: the output is computed in tiles, and a
    GEMM pays about one tile's rows and columns beyond its own (the partly filled last
    tiles and wave, the prologue and epilogue): rate x m/(m + m0) x n/(n + m0), m0 =
    gemm_half_size. A routed expert's GEMM with few rows runs slower for it."""
    half = mach.constants.gemm_half_size
    shape_eff = (m / (m + half)) * (n / (n + half)) if half else 1.0
    return max(2 * m * k * n / (mach.gemm_rate * shape_eff), e * (m * k + k * n + m * n) / mach.memory_rate)


@dataclass(frozen=True)
class Gemm:
    """One GEMM shape of a layer: [m, k] x [k, n], `count` times (a grouped GEMM's local
    experts)."""
    name: str
    m: float
    k: int
    n: int
    count: int = 1

    def forward_s(self, e: int, mach: Machine) -> float:
        return self.count * _gemm(self.m, self.k, self.n, e, mach)


def _swiglu(name: str, m: float, h: int, f: int, count: int = 1) -> list[Gemm]:
    return [Gemm(f"{name} gate", m, h, f, count), Gemm(f"{name} up", m, h, f, count),
            Gemm(f"{name} down", m, f, h, count)]


def layer_gemms(cfg: ModelConfig, is_moe: bool, p: ParallelConfig, train: TrainConfig) -> list[Gemm]:
    """The GEMMs of one layer for one micro-batch on one rank (module docstring), forward."""
    moe, h, d = cfg.moe, cfg.hidden_size, cfg.dim_head
    mb = MicroBatchShape(train.micro_batch_size, train.seq_len // p.cp, p.tp, 2)
    t, t_sp = mb.tokens, mb.sp_tokens
    q_heads, kv_heads = cfg.num_heads // p.tp, local_kv_heads(cfg.num_kv_heads, p.tp)
    out = [Gemm("qkv", t, h, (q_heads + 2 * kv_heads) * d), Gemm("attention out", t, q_heads * d, h)]
    if not is_moe:
        return out + _swiglu("ffn", t, h, cfg.ffn_hidden_size // p.tp)
    local = moe.num_experts // p.ep
    per_expert = dispatch_rows(cfg, p, t_sp, worst=False).at_experts / local
    out += [Gemm("router", t_sp, h, moe.num_experts)]
    out += _swiglu("experts", per_expert, h, moe.ffn_hidden_size // p.etp, local)
    shared_f = moe.num_shared_experts * moe.shared_ffn_hidden_size // p.tp
    return out + (_swiglu("shared", t, h, shared_f) if shared_f else [])


def head_gemm(cfg: ModelConfig, p: ParallelConfig, train: TrainConfig) -> Gemm:
    return Gemm("head", train.micro_batch_size * train.seq_len // p.cp, cfg.hidden_size, cfg.vocab_size // p.tp)


def _layer(cfg: ModelConfig, is_moe: bool, p: ParallelConfig, train: TrainConfig, mach: Machine,
           dispatcher: str) -> dict:
    """Seconds of one layer for one micro-batch, forward + backward (+ recompute), by part."""
    c, moe, h, d = mach.constants, cfg.moe, cfg.hidden_size, cfg.dim_head
    e = 2 if train.precision == "bf16" else 4
    b, s = train.micro_batch_size, train.seq_len
    mb = MicroBatchShape(b, s // p.cp, p.tp, e)
    t, t_sp = mb.tokens, mb.sp_tokens
    q_heads = cfg.num_heads // p.tp
    rows = dispatch_rows(cfg, p, t_sp, worst=False)
    gemms = sum(g.forward_s(e, mach) for g in layer_gemms(cfg, is_moe, p, train))
    # Attention kernels lose efficiency on short blocks: a CP ring computes pairs of
    # s/(2 ring)-token zigzag chunks, each against every K/V chunk in turn.
    cp_core = cp_shape(cfg, p, train)
    block_eff = cp_core.block_tokens / (cp_core.block_tokens + c.attention_half_block)
    core = 2 * b * (s // p.cp) * s * q_heads * d / (mach.attention_rate * block_eff)
    shared_f = moe.num_shared_experts * moe.shared_ffn_hidden_size // p.tp
    if is_moe:
        ops = OPS["moe_layer"] + (OPS["shared"] if shared_f else 0)
    else:
        ops = OPS["dense_layer"]
    layer_id = kind_layer_id(cfg, is_moe)
    # The elementwise passes run over every row the dispatcher keeps (all gathered slots for
    # the all-gather one); its grouped GEMMs compute the local experts' rows only.
    held = dispatch_rows(cfg, p, t_sp, worst=False, dispatcher=dispatcher)
    touched = layer_bytes(cfg, layer_id, mb, held, p.etp, "none") + unkept_bytes(cfg, layer_id, mb, held, p.etp)
    elementwise = c.elementwise_passes * touched / mach.memory_rate / 3   # forward share
    # The CP core's own copies, fp32 merges and accumulators (engine/planner/cp_traffic.py).
    cp_fwd, cp_bwd = (n / mach.memory_rate for n in cp_hbm_bytes(cp_core))
    forward = gemms + core + elementwise
    redo = {"none": 0.0, "selective": core + cp_fwd, "full": forward + cp_fwd,
            "remat_aware": forward - core}[train.recompute]
    redo_share = redo / forward
    compute = c.compute_scale * (3 * forward + cp_fwd + cp_bwd + redo
                                 + ops * c.op_overhead_s * (1 + redo_share / 3))

    link, lat = mach.link, c.collective_latency_s
    tp_collectives = 2 + (2 if (not is_moe or shared_f) else 0)      # forward
    tp_each = lat + link.ring_time(tp_collective_bytes(t, h, e, p.tp), p.tp, 1) if p.tp > 1 else 0.0
    tp_redo = tp_collectives if train.recompute in ("full", "remat_aware") else 0
    tp = (2 * tp_collectives + tp_redo) * tp_each

    cp = _cp_exposed(cp_core, p, train.recompute, core, mach) if p.cp > 1 else 0.0

    ep = 0.0
    if is_moe and p.ep * p.etp > 1:
        passes = 2 + (1 if train.recompute in ("full", "remat_aware") else 0)
        if dispatcher == "allgather":
            group = p.ep * p.etp
            per_pass = (link.a2a_time(allgather_dispatch_bytes(t_sp, h, e, group), group, 1)
                        + 2 * (lat + (group - 1) * c.a2a_peer_latency_s))
        else:
            ep_part = a2a_bytes(rows.assigned, h, e, p.ep, 1)
            etp_part = a2a_bytes(rows.assigned, h, e, 1, p.etp)
            per_pass = (link.a2a_time(ep_part, p.ep, p.etp) + link.a2a_time(etp_part, p.etp, 1)
                        + 3 * lat + 2 * (p.ep - 1) * c.a2a_peer_latency_s)
        ep = passes * per_pass
    return {"compute": compute, "tp": tp, "cp": cp, "ep": ep}


def _cp_exposed(shape: CpShape, p: ParallelConfig, recompute: str, core: float, mach: Machine) -> float:
    """Exposed CP communication of one layer and micro-batch: the ring overlaps the attention
    blocks (all but its hop latencies hidden while it is shorter); the all-to-alls before and
    after the core are synchronous. A ring of a2a groups strides over tp x P ranks."""
    c, link, lat = mach.constants, mach.link, mach.constants.collective_latency_s
    sent = cp_comm_bytes(shape)
    redone = recompute in ("selective", "full")     # these re-run the core with its exchanges
    exposed = 0.0
    r, a2a = shape.ring_size, shape.a2a_size
    if r > 1:
        nbytes = sent["ring_fwd"] + sent["ring_bwd"] + (sent["ring_fwd"] if redone else 0.0)
        ring = link.ring_time(nbytes, r, p.tp * a2a) + 2 * (r - 1) * lat
        exposed += max(0.0, ring - 3 * core) + 2 * (r - 1) * lat
    if a2a > 1:
        passes = 2 + (1 if redone else 0)                # each: q/k/v there, out back
        per_pass = (link.a2a_time(sent["a2a_fwd"], a2a, p.tp)
                    + 2 * (lat + (a2a - 1) * c.a2a_peer_latency_s))
        exposed += passes * per_pass
    return exposed


def _ends(cfg: ModelConfig, p: ParallelConfig, train: TrainConfig, mach: Machine, last: bool) -> dict:
    """Embedding (first chunk) or head + loss (last chunk), one micro-batch."""
    e = 2 if train.precision == "bf16" else 4
    t = train.micro_batch_size * train.seq_len // p.cp
    vocab = cfg.vocab_size // p.tp
    tp_each = (mach.constants.collective_latency_s
               + mach.link.ring_time(tp_collective_bytes(t, cfg.hidden_size, e, p.tp), p.tp, 1)
               if p.tp > 1 else 0.0)
    compute = OPS["ends"] / 2 * mach.constants.op_overhead_s
    tp = 2 * tp_each
    if last:
        # The chunked CE streams about as many HBM bytes per logit as the unchunked one it
        # replaced (4e + 64 against 2e + 64 counted op by op, before any cache reuse of
        # its fp32 slices), so this term did not change; its slices add operators.
        loss = mach.constants.elementwise_passes * (e + 8) * t * vocab / mach.memory_rate
        slices = math.ceil(t / max(1, LOSS_ROW_CHUNK_ELEMS // vocab))
        compute += (3 * head_gemm(cfg, p, train).forward_s(e, mach) + loss
                    + (slices - 1) * LOSS_OPS_PER_SLICE * mach.constants.op_overhead_s)
        if p.tp > 1:   # vocab-parallel cross-entropy: all-reduces of the row max, then (sum-exp, target)
            tp += (LOSS_ALL_REDUCES * mach.constants.collective_latency_s
                   + mach.link.ring_time(2 * tp_collective_bytes(t, 3, 4, p.tp), p.tp, 1))
    return {"compute": mach.constants.compute_scale * compute, "tp": tp, "cp": 0.0, "ep": 0.0}


def _p2p_transfer(p: ParallelConfig, train: TrainConfig, cfg: ModelConfig, mach: Machine) -> float:
    """One chunk boundary's activation (or its gradient) from one PP rank to the next."""
    if p.pp == 1:
        return 0.0
    e = 2 if train.precision == "bf16" else 4
    nbytes = train.micro_batch_size * train.seq_len // (p.cp * p.tp) * cfg.hidden_size * e
    return mach.constants.collective_latency_s + mach.link.ring_time(nbytes, p.pp, p.world_size // p.pp)


def _p2p_per_microbatch(p: ParallelConfig, one: float, stage_compute: float) -> float:
    """Exposed p2p per micro-batch in the steady state. 1F1B and GPipe wait for each of the
    2 vpp transfers. Interleaved: the exchange after F transfers while B runs and the one
    after B while the next F runs (engine/pipeline/schedules.py), so only what exceeds a
    chunk's forward is exposed."""
    if p.pp == 1:
        return 0.0
    if p.vpp == 1:
        return 2 * one
    return 2 * p.vpp * max(0.0, one - stage_compute / (3 * p.vpp))


def _p2p_fill_and_drain(p: ParallelConfig, one: float) -> float:
    """Interleaved: the first micro-batch's activation crosses all pp·vpp - 1 chunk
    boundaries before the steady state and its last gradient again after it, with nothing
    to hide behind: 2 (pp·vpp - 1) transfers per step (the simulation of
    engine/pipeline/verify.py gives exactly this; tests/engine/pipeline/test_schedules.py)."""
    return 2 * (p.pp * p.vpp - 1) * one if p.pp > 1 and p.vpp > 1 else 0.0


def _add(total: dict, part: dict, times: float = 1.0) -> None:
    for key, value in part.items():
        total[key] = total.get(key, 0.0) + times * value


def _memo(cache: dict | None, key: tuple, compute):
    if cache is None:
        return compute()
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def stage_times(cfg, p, train, mach, dispatcher, cache: dict | None = None,
                ranks: list[RankInfo] | None = None) -> dict[int, dict]:
    """Seconds per micro-batch, by part, of the representative PP ranks (the first rank of
    each distinct chunk composition: a stage's time depends on its chunks only)."""
    key = (p.tp, p.cp, p.cp_a2a_group_size, p.ep, p.etp, train.micro_batch_size, train.recompute)
    layer = {k: _memo(cache, ("layer", k) + key, lambda k=k: _layer(cfg, k, p, train, mach, dispatcher))
             for k in (False, True)}
    first = _memo(cache, ("first",) + key, lambda: _ends(cfg, p, train, mach, last=False))
    last = _memo(cache, ("last",) + key, lambda: _ends(cfg, p, train, mach, last=True))
    one = _p2p_transfer(p, train, cfg, mach)
    stages = {}
    for info in ranks if ranks is not None else rank_infos(cfg, p, train.seq_len):
        total = {"compute": 0.0, "tp": 0.0, "cp": 0.0, "ep": 0.0, "pp": 0.0}
        summary = info.summary
        if summary.dense:
            _add(total, layer[False], summary.dense)
        if summary.moe:
            _add(total, layer[True], summary.moe)
        if summary.first:
            _add(total, first)
        if summary.last:
            _add(total, last)
        total["pp"] = _p2p_per_microbatch(p, one, total["compute"])
        stages[info.rank] = total
    return stages


def _dp_and_optimizer(cfg, p, train, mach, stage_compute: float, ranks: list[RankInfo]
                      ) -> tuple[float, float]:
    """(exposed gradient reduction + ZeRO-1 parameter all-gather, optimizer update) seconds.
    The all-gather is exposed whole, or with train.overlap_param_gather what the first
    chunk forwards of the next step do not hide.

    PP rank r finishes its last backward r backward steps (of one chunk) before rank 0 in
    the schedule's cool-down, so its reduction has that much more time to hide (with
    overlap_grad_reduce, also its last backward). The update needs every rank's reduced
    gradients (the global grad norm), so it and the all-gather after it start together."""
    link, lat = mach.link, mach.constants.collective_latency_s
    param_bytes = 2 if train.precision == "bf16" else 4
    backward_step = 2 / 3 * stage_compute / p.vpp     # one chunk's backward, one micro-batch
    worst_reduce = worst_gather = worst_opt = 0.0
    for info in ranks:
        count = info.count
        owned = owned_elements(count, p, train.zero1)
        dense = dp_bytes(count.dense, param_bytes, p.dp * p.cp, train.zero1)
        expert = dp_bytes(count.expert, param_bytes, p.edp, train.zero1)
        reduce = (link.ring_time(dense, p.dp * p.cp, p.tp) + link.ring_time(expert, p.edp, p.etp * p.ep)
                  + 2 * lat)
        gather = 0.0
        if train.zero1:   # the parameter all-gather (model dtype) runs after the update
            gather = reduce * param_bytes / (4 + param_bytes)
            reduce -= gather
        hidden = info.rank * backward_step + (p.vpp * backward_step if train.overlap_grad_reduce else 0.0)
        worst_reduce = max(worst_reduce, reduce - hidden)
        if train.overlap_param_gather:
            gather = _gather_behind_forward(gather, info.rank, p, backward_step / 2)
        worst_gather = max(worst_gather, gather)
        per_elem = mach.constants.optimizer_s_per_elem
        update = (owned * per_elem if per_elem is not None
                  else (ADAM_BYTES_PER_ELEM * owned + 4 * count.total) / mach.memory_rate)
        worst_opt = max(worst_opt, update)
    return max(0.0, worst_reduce) + max(0.0, worst_gather), worst_opt


def _gather_behind_forward(gather: float, rank: int, p: ParallelConfig, chunk_forward: float) -> float:
    """Exposed part of a rank's parameter all-gather run bucket by bucket in forward order
    behind the next step's forward (train.overlap_param_gather). Chunk v's share, the
    first (v + 1)/vpp of the gather, must be done when its first forward starts, after
    v·pp + rank chunk forwards (the interleaved warm-up visits each chunk for pp
    micro-batches); the binding chunk is the first or the last (both sides are linear in v)."""
    late = [(v + 1) / p.vpp * gather - (v * p.pp + rank + 1) * chunk_forward for v in (0, p.vpp - 1)]
    return max(0.0, *late)


def estimate_step(cfg: ModelConfig, p: ParallelConfig, train: TrainConfig, mach: Machine, *,
                  dispatcher: str = "alltoall", cache: dict | None = None,
                  ranks: list | None = None) -> StepEstimate:
    """Predicted step time, MFU and breakdown of layout `p` (module docstring). `cache`: a
    dict the planner keeps for one search (per-layer figures shared by many layouts);
    `ranks`: the representative ranks (memory.rank_infos), when the caller has them."""
    m = train.num_microbatches(p.dp)
    ranks = ranks if ranks is not None else rank_infos(cfg, p, train.seq_len)
    stages = stage_times(cfg, p, train, mach, dispatcher, cache, ranks)
    slowest = max(stages.values(), key=lambda s: sum(s.values()))
    per_mb = sum(slowest.values())
    # Fill and drain: one micro-batch passes every other stage once (forward, then
    # backward), the steady state runs at the slowest stage's pace: (sum - slowest)/vpp,
    # = (pp - 1)/vpp x per_mb for balanced stages.
    every_stage = sum(sum(stages[info.rank].values()) * info.copies for info in ranks)
    bubble = max(every_stage - per_mb, 0.0) / p.vpp
    dp, optimizer = _dp_and_optimizer(cfg, p, train, mach, slowest["compute"], ranks)
    breakdown = {k: m * v for k, v in slowest.items()}
    breakdown["pp"] += _p2p_fill_and_drain(p, _p2p_transfer(p, train, cfg, mach))
    breakdown.update(bubble=bubble, dp=dp, optimizer=optimizer)
    step = sum(breakdown.values())
    flops = _memo(cache, ("flops", train.global_batch_size, train.seq_len),
                  lambda: model_flops_per_iteration(cfg, train.global_batch_size, train.seq_len))
    per_gpu = flops / (step * p.world_size)
    return StepEstimate(step, per_gpu / mach.device.peak_flops, per_gpu / 1e12, breakdown)
