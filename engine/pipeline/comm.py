"""Point-to-point exchange of activations and gradients between pipeline stages.

All sends and receives between two compute steps are posted as one
`dist.batch_isend_irecv` (one NCCL group), so two neighbours that both send and both
receive cannot block each other in a send. `post` returns without waiting: the pipeline
executor waits for a batch only when a compute consumes what it receives, and for its
sends at the end of the run (engine/pipeline/verify.py proves the schedules free of
deadlock under exactly these semantics). Shapes are fixed and passed in
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

    def post(self, sends: Sequence[tuple[int, torch.Tensor]],
             recv_from: Sequence[int]) -> tuple[list[torch.Tensor], "PendingExchange"]:
        """Posts every send (peer, tensor) and a receive from each peer in `recv_from` as
        one batch without waiting; returns the receive buffers in `recv_from` order (valid
        once the handle is waited for) and the handle. Ops to the same peer are matched in
        the order given."""
        payloads = [(peer, self._check(t)) for peer, t in sends]
        received = [torch.empty(self.shape, dtype=self.dtype, device=self.device) for _ in recv_from]
        ops = [dist.P2POp(dist.isend, t, peer, group=self.group) for peer, t in payloads]
        ops += [dist.P2POp(dist.irecv, t, peer, group=self.group) for peer, t in zip(recv_from, received)]
        works = dist.batch_isend_irecv(ops) if ops else []
        self.link.add(self.shape.numel() * self.dtype.itemsize * len(payloads))
        return received, PendingExchange(works, [t for _, t in payloads])


class PendingExchange:
    """The works of one posted batch; keeps the sent tensors alive until they are waited
    for. On CUDA, wait() makes the current stream wait (no host synchronisation); on gloo
    it blocks until the batch is done."""

    def __init__(self, works: list, payloads: list[torch.Tensor]):
        self._works, self._payloads = works, payloads

    @property
    def waited(self) -> bool:
        return self._works is None

    def wait(self) -> None:
        if self._works is None:
            return
        for work in self._works:
            work.wait()
        self._works, self._payloads = None, []
