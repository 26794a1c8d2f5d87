"""Step-level MoE metrics and the expert-bias update, over the MoE layers of a model chunk.

All values cover the layers held by this rank (one pipeline stage); they are global over
the stage's ranks, so the trainer only needs to combine pipeline stages. Each layer keeps
one device-side record per micro-batch (routing_stats.py); `finalize_routing_stats`
reduces the records whose reduction was deferred - all layers and micro-batches of the step
in one collective per group - and `moe_stats_tensors` turns them into 0-d device tensors,
so a step reads its routing statistics to the host once (the trainer batches that read
with its own metrics).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .aux_loss import routing_values
from .layer import MoELayer
from .routing_stats import reduce_deferred


def moe_layers(model_or_layers: nn.Module | Iterable[nn.Module]) -> list[MoELayer]:
    if isinstance(model_or_layers, nn.Module):
        return [m for m in model_or_layers.modules() if isinstance(m, MoELayer)]
    layers: list[MoELayer] = []
    for item in model_or_layers:
        layers.extend(moe_layers(item))
    return layers


def set_aux_loss_scale(model_or_layers, scale: float) -> None:
    """The trainer calls this with 1 / num_microbatches."""
    for layer in moe_layers(model_or_layers):
        layer.aux_loss_scale = scale


@torch.no_grad()
def finalize_routing_stats(model_or_layers) -> None:
    """Makes every record of the step global (a collective when some were deferred: call it
    on every rank of the stage alike) and adds training records to the expert-bias counts."""
    layers = moe_layers(model_or_layers)
    reduce_deferred([record.pending for layer in layers for record in layer.step_records])
    for layer in layers:
        if layer.router.expert_bias is None:
            continue
        for record in layer.step_records:
            if record.training and not record.bias_counted:
                counts_e = record.pending.wait().counts_e
                total = layer.bias_counts_e
                layer.bias_counts_e = counts_e.clone() if total is None else total.to(counts_e.device) + counts_e
                record.bias_counted = True


def _layer_summary(layer: MoELayer) -> dict[str, torch.Tensor]:
    values = [routing_values(record.pending.wait(), layer.cfg) for record in layer.step_records]
    counts_e = torch.stack([v["tokens_per_expert"] for v in values]).sum(0)
    mean = counts_e.mean()
    imbalance = torch.where(counts_e.sum() > 0, counts_e.max() / mean.clamp_min(1e-30), 1.0)
    return {"aux_loss": torch.stack([v["aux_loss"] for v in values]).mean(),
            "z_loss": torch.stack([v["z_loss"] for v in values]).mean(),
            "routed": sum(v["routed"] for v in values), "kept": sum(v["kept"] for v in values),
            "imbalance": imbalance}


@torch.no_grad()
def moe_stats_tensors(model_or_layers, reset: bool = True) -> dict[str, torch.Tensor]:
    """Averages since the last reset, over forwards and layers, as 0-d device tensors.

    aux_loss / z_loss: mean per layer and micro-batch (without coefficients);
    dropped_token_fraction: dropped / routed top-k assignments;
    load_imbalance: mean over layers of max/mean tokens per expert (1 = balanced),
    load_imbalance_max: the worst layer.
    """
    finalize_routing_stats(model_or_layers)
    layers = [m for m in moe_layers(model_or_layers) if m.step_records]
    if not layers:
        return {}
    per_layer = [_layer_summary(layer) for layer in layers]
    if reset:
        for layer in layers:
            layer.reset_stats()
    stacked = {key: torch.stack([s[key] for s in per_layer]) for key in per_layer[0]}
    routed, kept = stacked["routed"].sum(), stacked["kept"].sum()
    return {"aux_loss": stacked["aux_loss"].mean(), "z_loss": stacked["z_loss"].mean(),
            "dropped_token_fraction": torch.where(routed > 0, 1.0 - kept / routed.clamp_min(1.0), 0.0),
            "routed_assignments": routed, "kept_assignments": kept,
            "load_imbalance": stacked["imbalance"].mean(), "load_imbalance_max": stacked["imbalance"].max()}


def moe_stats(model_or_layers, reset: bool = True) -> dict[str, float]:
    """`moe_stats_tensors` read to the host in one copy."""
    tensors = moe_stats_tensors(model_or_layers, reset)
    if not tensors:
        return {}
    return dict(zip(tensors, torch.stack(list(tensors.values())).tolist()))


def layer_imbalance_tensors(chunks) -> dict[int, torch.Tensor]:
    """{global layer id: max/mean tokens per expert of the step, a 0-d device tensor} for the
    MoE layers of these model chunks (their `layers` are keyed by global layer id). Reads,
    never resets; call after finalize_routing_stats."""
    out = {}
    for chunk in chunks:
        for layer_id, block in chunk.layers.items():
            for layer in moe_layers(block):
                if layer.step_records:
                    out[int(layer_id)] = _layer_summary(layer)["imbalance"]
    return out


@torch.no_grad()
def update_expert_biases(model_or_layers) -> None:
    """After the optimizer step: bias += rate * sign(mean - count) on every layer with an
    expert bias, using the counts of the step (summed over the stage group)."""
    finalize_routing_stats(model_or_layers)
    for layer in moe_layers(model_or_layers):
        layer.update_expert_bias()
