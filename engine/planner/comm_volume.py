"""Bytes one rank sends per step along each axis, as the engine's counters report them
(the `comm_bytes_{tp,cp,ep,pp,dp}` step metrics, engine/train/comm_stats.py), predicted
from the shapes with the formulas of engine/planner/comm_model.py that the cost model
times. Checked against a real Trainer step in tests/engine/planner/test_comm_volume.py.
"""
from __future__ import annotations

from engine.config.model import ModelConfig
from engine.parallel.config import ParallelConfig
from engine.config.train import TrainConfig

from .comm_model import a2a_bytes, allgather_dispatch_bytes, dp_bytes, tp_collective_bytes
from .cp_traffic import cp_comm_bytes, cp_shape
from .memory import dispatch_rows
from .shards import rank_chunks, rank_params, summarize

RECOMPUTED_FORWARD = {"none": set(), "selective": {"cp"}, "full": {"tp", "cp", "ep"},
                      "remat_aware": {"tp", "ep"}}   # collectives a recompute mode re-runs


def step_comm_bytes(cfg: ModelConfig, p: ParallelConfig, train: TrainConfig, pp_rank: int,
                    dispatcher: str = "alltoall") -> dict[str, float]:
    """{"tp", "cp", "ep", "pp", "dp"}: bytes PP rank `pp_rank` sends in one step."""
    chunks = rank_chunks(cfg, p.pp, p.vpp, train.seq_len)[pp_rank]
    summary, count = summarize(chunks), rank_params(cfg, p, chunks)
    e = 2 if train.precision == "bf16" else 4
    h, m = cfg.hidden_size, train.num_microbatches(p.dp)
    t = train.micro_batch_size * train.seq_len // p.cp
    redo = RECOMPUTED_FORWARD[train.recompute]
    shared = cfg.moe.num_shared_experts > 0

    one_tp = tp_collective_bytes(t, h, e, p.tp)
    per_layer_fwd = {False: 4, True: 2 + (2 if shared else 0)}         # collectives per forward
    tp = sum(n * per_layer_fwd[k] * (2 + ("tp" in redo)) for k, n in ((False, summary.dense),
                                                                     (True, summary.moe)))
    tp = tp * one_tp + 2 * one_tp * (summary.first + summary.last)    # embedding, head
    if summary.last and p.tp > 1:
        tp += 3 * t * 4 * (p.tp - 1) / p.tp * 2                       # vocab-parallel CE all-reduces

    sent = cp_comm_bytes(cp_shape(cfg, p, train))
    fwd, bwd = sent["a2a_fwd"] + sent["ring_fwd"], sent["a2a_bwd"] + sent["ring_bwd"]
    layers = summary.dense + summary.moe
    cp = layers * (fwd + bwd + (fwd if "cp" in redo else 0))

    rows = dispatch_rows(cfg, p, t // p.tp, worst=False)
    if p.ep * p.etp == 1:
        ep = 0.0
    elif dispatcher == "allgather":
        ep = allgather_dispatch_bytes(t // p.tp, h, e, p.ep * p.etp)
    else:
        ep = a2a_bytes(rows.assigned, h, e, p.ep, p.etp)
    ep *= summary.moe * (2 + ("ep" in redo))

    act = train.micro_batch_size * train.seq_len // (p.cp * p.tp) * h * e
    pp = 0.0 if p.pp == 1 else act * (2 * len(chunks) - summary.first - summary.last)

    param_bytes = 2 if train.precision == "bf16" else 4
    dp = (dp_bytes(count.dense, param_bytes, p.dp * p.cp, train.zero1)
          + dp_bytes(count.expert, param_bytes, p.edp, train.zero1))
    return {"tp": m * tp, "cp": m * cp, "ep": m * ep, "pp": m * pp, "dp": dp}
