"""What the MoE layer tests read: the global routing statistics of a layer's last forward as
Python values (the training loop reads engine.moe.tracking.moe_stats once per step)."""
from __future__ import annotations

from engine.moe.aux_loss import routing_values


def last_stats(layer) -> dict:
    values = routing_values(layer.step_records[-1].pending.wait(), layer.cfg)
    out = {k: float(v) for k, v in values.items() if k != "tokens_per_expert"}
    out["tokens_per_expert"] = values["tokens_per_expert"].cpu()
    return out
