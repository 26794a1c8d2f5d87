"""Measures what each recompute mode keeps for backward and how often attention runs.

Saved bytes are counted with autograd's saved-tensor hooks (each storage once) during one
forward; attention-forward block calls are read from the attention cores' counters over
one forward + backward. LightSeq's remat-aware mode must keep the call count at one per
block per layer, like `none`, while saving far less than `none`.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.parallel.traffic import Traffic, by_kind


class SavedTensorCounter:
    """Context manager: bytes of distinct storages autograd saves for backward."""

    def __init__(self) -> None:
        self.bytes = 0
        self._seen: set[int] = set()

    def _pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self._seen and not isinstance(tensor, nn.Parameter):
            self._seen.add(key)
            self.bytes += storage.nbytes()
        return tensor

    def __enter__(self) -> "SavedTensorCounter":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def _attention_cores(model: nn.Module) -> list[nn.Module]:
    return [block.attention.core for block in model.layers.values()]


def measure_recompute(model: nn.Module, inputs: torch.Tensor, positions: torch.Tensor,
                      mode: str, traffic: Traffic | None = None) -> dict[str, float]:
    """One forward + backward of `model` under `mode`: saved bytes per layer, attention-forward
    block calls, and the CP bytes counted in `traffic` (the mesh's) meanwhile."""
    before = traffic.snapshot() if traffic is not None else {}
    model.train()
    model.set_recompute(mode)
    cores = _attention_cores(model)
    for core in cores:
        core.reset_counters()
    model.zero_grad(set_to_none=True)
    with SavedTensorCounter() as counter:
        out = model(inputs, positions)
    forward_calls = sum(core.block_forward_calls for core in cores)
    out.float().square().mean().backward()
    return {"saved_bytes_per_layer": counter.bytes / len(model.layers),
            "attention_forward_calls": sum(core.block_forward_calls for core in cores),
            "forward_pass_calls": forward_calls,
            "attention_bytes_sent": _cp_bytes(traffic.since(before)) if traffic is not None else 0}


def _cp_bytes(per_axis: dict) -> int:
    return int(by_kind(per_axis)["comm_bytes_cp"])
