"""Typed names of the folded mesh's axes.

`Axis` is a str-valued enum, so `Axis.TP == "tp"` and either spelling keys the mesh's
tables; code inside the engine uses the enum, configs and metrics use the strings.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Axis(str, Enum):
    TP = "tp"
    CP = "cp"
    DP = "dp"
    PP = "pp"
    DP_CP = "dp_cp"        # dense gradient reduction
    TP_CP = "tp_cp"        # ranks sharing one sequence
    STAGE = "stage"        # all ranks of one pipeline stage
    ETP = "etp"
    EP = "ep"
    EDP = "edp"            # expert gradient reduction
    ETP_EP = "etp_ep"      # token dispatcher group
    EMBED = "embed"        # first and last stage (tied embeddings)
    CP_A2A = "cp_a2a"      # hybrid CP: all-to-all sub-group
    CP_RING = "cp_ring"    # hybrid CP: ring across the sub-groups

    __str__ = str.__str__
    __format__ = str.__format__


# Axes whose every group contains this rank's whole TP group: a gradient reduced over one of
# them is already identical on all TP ranks.
TP_COVERING_AXES = frozenset((Axis.TP, Axis.TP_CP, Axis.STAGE))


@dataclass(frozen=True)
class SubAxis:
    """Runs of `size` consecutive ranks of an axis's group, e.g. the TP ranks that hold the
    same replicated kv head when num_kv_heads < tp."""

    axis: Axis
    size: int

    def __str__(self) -> str:
        return f"{self.axis.value}/{self.size}"
