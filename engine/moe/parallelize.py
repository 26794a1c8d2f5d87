"""Shard the MoE layers of an initialised (full-shape) model onto the folded mesh.

For every MoELayer: keep this rank's contiguous block of E/ep experts and its F/etp
slice (column-parallel w_gate/w_up along F, row-parallel w_down along F), tag them as
expert params (grads SUM-reduced over "edp"), install the dispatcher on the etp x ep
group and give the layer the statistics groups ("stage", "tp_cp"). Router and shared
experts stay dense here (the TP code handles the shared expert). A shard is exactly the
slice of the single-process parameter, so a layout change is a re-slice.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.parallel.axes import Axis
from engine.parallel.mesh import FoldedMesh
from engine.parallel.param_attrs import add_slice, mark_expert
from engine.parallel.traffic import Link

from .dispatcher_allgather import AllGatherDispatcher
from .dispatcher_alltoall import AllToAllDispatcher
from .dispatcher_local import LocalDispatcher
from .layer import MoELayer
from .tracking import moe_layers

DISPATCHERS = ("alltoall", "allgather", "local")


def expert_slice(num_experts: int, ffn_hidden_size: int, ep: int, ep_rank: int, etp: int,
                 etp_rank: int) -> tuple[slice, slice]:
    """(experts, F) index ranges held by the rank at (ep_rank, etp_rank)."""
    if num_experts % ep or ffn_hidden_size % etp:
        raise ValueError(f"num_experts={num_experts} / ep={ep} or ffn_hidden_size={ffn_hidden_size} "
                         f"/ etp={etp} is not an integer")
    num_local, f_local = num_experts // ep, ffn_hidden_size // etp
    return (slice(ep_rank * num_local, (ep_rank + 1) * num_local),
            slice(etp_rank * f_local, (etp_rank + 1) * f_local))


@torch.no_grad()
def shard_experts_(layer: MoELayer, experts_range: slice, f_range: slice) -> None:
    experts = layer.experts
    slices = {"w_gate": (experts_range, slice(None), f_range),
              "w_up": (experts_range, slice(None), f_range),
              "w_down": (experts_range, f_range, slice(None))}
    for name, index in slices.items():
        param = nn.Parameter(getattr(experts, name)[index].clone())
        mark_expert(param)
        for dim, part in enumerate(index):
            if part != slice(None):
                add_slice(param, dim, part.start, part.stop - part.start)
        setattr(experts, name, param)


def make_dispatcher(kind: str, num_experts: int, mesh: FoldedMesh) -> nn.Module:
    if kind not in DISPATCHERS:
        raise ValueError(f"moe dispatcher={kind!r}: expected one of {DISPATCHERS}")
    if mesh.size("etp_ep") == 1:
        return LocalDispatcher()     # all experts here: nothing to exchange
    if kind == "local":
        raise ValueError(f"moe dispatcher=local needs ep = etp = 1 (dispatch group {mesh.ranks('etp_ep')})")
    link = Link(mesh.traffic, Axis.ETP_EP)   # a2a over ep and gathers over etp: both inside it
    if kind == "alltoall":
        return AllToAllDispatcher(num_experts, mesh.group(Axis.EP), mesh.group(Axis.ETP), link)
    return AllGatherDispatcher(num_experts, mesh.group(Axis.ETP_EP), mesh.group(Axis.EP), link)


def parallelize_moe(model: nn.Module, mesh: FoldedMesh, dispatcher: str = "alltoall") -> list[MoELayer]:
    """Shards every MoELayer in place (call once, after init, before building the
    optimizer); returns the layers."""
    cfg = mesh.config
    layers = moe_layers(model)
    for layer in layers:
        if layer.experts.w_gate.shape != (layer.cfg.num_experts, layer.experts.w_gate.shape[1],
                                          layer.cfg.ffn_hidden_size):
            raise ValueError("parallelize_moe: layer is already sharded (expected full-shape experts)")
        experts_range, f_range = expert_slice(
            layer.cfg.num_experts, layer.cfg.ffn_hidden_size, cfg.ep, mesh.rank_in("ep"),
            cfg.etp, mesh.rank_in("etp"))
        shard_experts_(layer, experts_range, f_range)
        layer.dispatcher = make_dispatcher(dispatcher, layer.cfg.num_experts, mesh)
        layer.stage_group = mesh.group("stage")
        layer.seq_group = mesh.group("tp_cp")
    return layers
