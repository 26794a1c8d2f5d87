"""Plain gradient synchronisation: SUM all-reduce of each gradient over its reduce axes.

Gradients are bucketed by axis tuple and flattened so one collective covers many tensors.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn

from engine.parallel.mesh import FoldedMesh
from engine.parallel.param_attrs import reduce_axes


def _buckets(params: list[nn.Parameter]) -> dict[tuple[str, ...], list[nn.Parameter]]:
    out: dict[tuple[str, ...], list[nn.Parameter]] = defaultdict(list)
    for p in params:
        if p.grad is not None:
            out[reduce_axes(p)].append(p)
    return out


@torch.no_grad()
def all_reduce_grads(params: list[nn.Parameter], mesh: FoldedMesh) -> int:
    """SUM-reduces every gradient over its axes; returns bytes sent (ring all-reduce
    volume 2(n-1)/n of the buffer per axis) for communication accounting."""
    sent = 0
    for axes, group_params in _buckets(params).items():
        grads = [p.grad for p in group_params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        for axis in axes:
            n = mesh.size(axis)
            if n == 1:
                continue
            dist.all_reduce(flat, group=mesh.group(axis))
            sent += int(2 * (n - 1) / n * flat.numel() * flat.element_size())
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    return sent
