"""What autograd keeps for backward while a function builds its graph."""
from __future__ import annotations

from typing import Callable

import torch


def saved_tensors(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """(fn(), {storage pointer: a saved tensor on it}): one entry per distinct storage."""
    kept = []

    def pack(tensor):
        kept.append(tensor)
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return out, {t.untyped_storage().data_ptr(): t for t in kept}
