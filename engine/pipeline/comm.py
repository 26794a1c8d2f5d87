"""Point-to-point exchange of activations and gradients between pipeline stages.

All sends and receives between two compute steps are posted as one
`dist.batch_isend_irecv` and waited on together, so two neighbours that both send and
both receive cannot block each other in a send. Shapes are fixed and passed in
([micro_batch, s_local, h], s_local after CP and SP sharding), so no shape handshake
is needed. Peers are global ranks (from `mesh.ranks("pp")`).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from engine.parallel.traffic import Link


class StageP2P:
    """Fixed-shape p2p over one PP group; the bytes it sends count on `link` (the mesh's
    Traffic, pp axis)."""

    def __init__(self, group, shape: Sequence[int], dtype: torch.dtype, link: Link,
                 device: torch.device | str = "cpu"):
        self.group, self.link = group, link
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.device = torch.device(device)

    def _check(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.shape != self.shape or tensor.dtype != self.dtype:
            raise ValueError(
                f"pipeline p2p: tensor {tuple(tensor.shape)} {tensor.dtype} does not match the "
                f"declared activation shape {tuple(self.shape)} {self.dtype} "
                "([micro_batch_size, s_local, hidden_size], s_local after CP/SP sharding)")
        return tensor.detach().contiguous()

    def exchange(self, sends: Sequence[tuple[int, torch.Tensor]],
                 recv_from: Sequence[int]) -> list[torch.Tensor]:
        """Posts every send (peer, tensor) and a receive from each peer in `recv_from` as
        one batch, waits for all, and returns the received tensors in `recv_from` order.
        Ops to the same peer are matched in the order given."""
        payloads = [(peer, self._check(t)) for peer, t in sends]
        received = [torch.empty(self.shape, dtype=self.dtype, device=self.device) for _ in recv_from]
        ops = [dist.P2POp(dist.isend, t, peer, group=self.group) for peer, t in payloads]
        ops += [dist.P2POp(dist.irecv, t, peer, group=self.group) for peer, t in zip(recv_from, received)]
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        self.link.add(self.shape.numel() * self.dtype.itemsize * len(payloads))
        return received
