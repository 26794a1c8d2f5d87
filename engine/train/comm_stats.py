"""Bytes sent per step along each mesh axis, read from the counters of the modules that
communicate (dispatchers, TP regions, CP cores, pipeline p2p) and the optimizer."""
from __future__ import annotations

from engine.moe.tracking import moe_comm_bytes


def _tp_bytes(trainer) -> int:
    return sum(c.tp_comm.bytes_sent for c in trainer.chunks if c.tp_comm is not None)


def _cp_bytes(trainer) -> int:
    total = 0
    for chunk in trainer.chunks:
        for block in chunk.layers.values():
            total += getattr(block.attention.core, "bytes_sent", 0)
    return total


def _pp_bytes(trainer) -> int:
    return trainer.executor.comm_bytes["sent"] if trainer.executor is not None else 0


def collect_comm_bytes(trainer, since: dict | None = None, optimizer_bytes: dict | None = None) -> dict:
    """Cumulative counters now, or the difference since `since` plus the optimizer's bytes of
    this step (gradient reductions and the ZeRO-1 parameter all-gather), by axis kind."""
    now = {"comm_bytes_ep": float(moe_comm_bytes(trainer.chunks)),
           "comm_bytes_tp": float(_tp_bytes(trainer)),
           "comm_bytes_cp": float(_cp_bytes(trainer)),
           "comm_bytes_pp": float(_pp_bytes(trainer))}
    if since is None:
        return now
    out = {k: v - since.get(k, 0.0) for k, v in now.items()}
    optimizer_bytes = optimizer_bytes or {}
    # sequence-parallel replicated params reduce over tp: count that on the tp axis
    # (tied embeddings sum over the first/last stage: pp)
    out["comm_bytes_tp"] += float(optimizer_bytes.get("tp", 0))
    out["comm_bytes_pp"] += float(optimizer_bytes.get("pp", 0))
    out["comm_bytes_dp"] = float(sum(v for k, v in optimizer_bytes.items() if k not in ("tp", "pp")))
    return out
