"""The optimizer's checkpoint state: a flat dict of tensors and JSON-able scalars.

Per parameter name (only for params with a non-empty owned range on this rank):
- "range/<name>": [lo, hi, numel]: the elements [lo, hi) of the flattened local param
  whose state this rank holds (the whole param without ZeRO-1). Enough to reshard later.
- "exp_avg/<name>", "exp_avg_sq/<name>": 1-D fp32 Adam moments of that range;
- "main_param/<name>": 1-D fp32 master weights of that range, only for params stored in
  a lower precision (fp32 params are their own master weights, saved with the model).
Scalars: "adam_step" (number of AdamW updates taken), "zero1".
"""
from __future__ import annotations

import torch

from .flat_bucket import FlatBucket

MOMENTS = ("exp_avg", "exp_avg_sq")


def owned_views(bucket: FlatBucket):
    """(name, [lo, hi, numel], {kind: 1-D view}) for every param range this rank owns."""
    plan = bucket.plan
    for slot in plan.slots:
        owned = plan.owned_range(slot)
        if owned is None:
            continue
        lo, hi = owned
        local = slice(slot.offset + lo - plan.shard_start, slot.offset + hi - plan.shard_start)
        views = {"exp_avg": bucket.exp_avg[local], "exp_avg_sq": bucket.exp_avg_sq[local]}
        if bucket.separate_main:
            views["main_param"] = bucket.main_param[local]
        yield slot.name, [lo, hi, slot.numel], views


def optimizer_state(buckets: list[FlatBucket], adam_step: int, zero1: bool) -> dict:
    """Views of the live state, as torch's Optimizer.state_dict() returns its tensors: a
    device copy would add 8-12 bytes per owned element at every save (the checkpoint
    writers copy to the host themselves)."""
    out: dict = {"adam_step": adam_step, "zero1": zero1}
    for bucket in buckets:
        for name, owned, views in owned_views(bucket):
            out[f"range/{name}"] = owned
            for kind, view in views.items():
                out[f"{kind}/{name}"] = view.detach()
    return out


def _expected_entries(buckets: list[FlatBucket]) -> dict:
    """key -> owned range (range/ keys) or tensor shape, without copying any state."""
    out: dict = {}
    for bucket in buckets:
        for name, owned, views in owned_views(bucket):
            out[f"range/{name}"] = owned
            out.update({f"{kind}/{name}": view.shape for kind, view in views.items()})
    return out


def _check_layout(state: dict, expected: dict, zero1: bool) -> None:
    if "adam_step" not in state or bool(state.get("zero1")) != zero1:
        raise ValueError(f"optimizer state has zero1={state.get('zero1')} and adam_step="
                         f"{state.get('adam_step')}; this run has zero1={zero1}")
    given = set(state) - {"adam_step", "zero1"}
    missing, unexpected = sorted(set(expected) - given), sorted(given - set(expected))
    if missing or unexpected:
        raise ValueError(f"optimizer state does not match this layout: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    for key, value in expected.items():
        if key.startswith("range/") and list(state[key]) != list(value):
            raise ValueError(f"optimizer state {key}={list(state[key])} but this rank owns {value}")
        if not key.startswith("range/") and tuple(state[key].shape) != tuple(value):
            raise ValueError(f"optimizer state {key} has shape {tuple(state[key].shape)}, "
                             f"expected {tuple(value)}")


@torch.no_grad()
def load_optimizer_state(buckets: list[FlatBucket], state: dict, zero1: bool) -> int:
    """Copies `state` into the buckets; returns adam_step. Raises ValueError naming the
    first mismatch when the state was saved with another layout."""
    _check_layout(state, _expected_entries(buckets), zero1)
    for bucket in buckets:
        for name, _, views in owned_views(bucket):
            for kind, view in views.items():
                view.copy_(state[f"{kind}/{name}"])
    return int(state["adam_step"])
