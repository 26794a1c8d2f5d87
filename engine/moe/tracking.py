"""Step-level MoE metrics and the expert-bias update, over the MoE layers of a model chunk.

All values cover the layers held by this rank (one pipeline stage); they are already
global over the stage's ranks, so the trainer only needs to combine pipeline stages.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .layer import MoELayer


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


def moe_stats(model_or_layers, reset: bool = True) -> dict[str, float]:
    """Averages since the last reset, over forwards and layers (detached).

    aux_loss / z_loss: mean per layer and micro-batch (without coefficients);
    dropped_token_fraction: dropped / routed top-k assignments;
    load_imbalance: mean over layers of max/mean tokens per expert (1 = balanced),
    load_imbalance_max: the worst layer.
    """
    layers = [m for m in moe_layers(model_or_layers) if m.stats_acc["forwards"]]
    if not layers:
        return {}
    imbalance = []
    aux = z = routed = kept = 0.0
    for layer in layers:
        acc = layer.stats_acc
        counts = acc["tokens_per_expert"]
        imbalance.append(float(counts.max() / counts.mean()) if counts.sum() > 0 else 1.0)
        aux += acc["aux_loss"] / acc["forwards"]
        z += acc["z_loss"] / acc["forwards"]
        routed += acc["routed"]
        kept += acc["kept"]
        if reset:
            layer.reset_stats()
    return {"aux_loss": aux / len(layers), "z_loss": z / len(layers),
            "dropped_token_fraction": 1.0 - kept / routed if routed else 0.0,
            "load_imbalance": sum(imbalance) / len(imbalance), "load_imbalance_max": max(imbalance)}


def load_imbalance_by_layer(chunks) -> dict[int, float]:
    """{global layer id: max/mean tokens per expert since the last reset} for the MoE layers
    of these model chunks (their `layers` are keyed by global layer id); reads, never resets."""
    out = {}
    for chunk in chunks:
        for layer_id, block in chunk.layers.items():
            for layer in moe_layers(block):
                counts = layer.stats_acc["tokens_per_expert"]
                if layer.stats_acc["forwards"] and counts.sum() > 0:
                    out[int(layer_id)] = float(counts.max() / counts.mean())
    return out


@torch.no_grad()
def update_expert_biases(model_or_layers) -> None:
    """After the optimizer step: bias += rate * sign(mean - count) on every layer with an
    expert bias, using the counts of the step (already summed over the stage group)."""
    for layer in moe_layers(model_or_layers):
        layer.update_expert_bias()
