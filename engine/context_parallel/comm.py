"""Communication primitives of context parallelism: ring p2p exchange and all-to-all.

Deadlock safety by ordering: every exchange is one `dist.batch_isend_irecv` holding exactly one
isend to the next ring rank and one irecv from the previous one, and all ranks post their
exchanges in the same sequence. NCCL fuses each batch into one group call, so the cyclic
dependency of a blocking send/recv ring never arises; gloo matches p2p messages per
(peer, tag) in posting order, and concurrent exchanges (K/V and dK/dV in the backward) use
distinct tags.

Hangs: `wait()` blocks on the process group. A peer that never posts its side makes the wait
fail after the group's timeout (gloo raises RuntimeError; NCCL's watchdog aborts the
communicator and tears the process down), so a hang surfaces as an error after the timeout
given to init_process_group / FoldedMesh / the hybrid sub-groups, never as a silent stall.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from engine.parallel.traffic import Link

KV_TAG = 0
GRAD_TAG = 1


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class RingExchange:
    """Double-buffered shift by one position along a ring of ranks.

    `start(buf)` sends buf to the next rank and receives the previous rank's buffer into a spare
    one; `wait()` returns the received buffer. The buffer sent last becomes the spare for the
    following receive, so a ring step allocates nothing and never overwrites a tensor in flight.
    A ring of one rank returns the buffer itself without communicating.
    """

    def __init__(self, group, ranks: list[int], position: int, link: Link, tag: int = KV_TAG):
        self.group, self.size, self.tag, self.link = group, len(ranks), tag, link
        self.next_rank = ranks[(position + 1) % self.size]
        self.prev_rank = ranks[(position - 1) % self.size]
        self._spare: torch.Tensor | None = None
        self._in_flight: tuple[list, torch.Tensor, torch.Tensor] | None = None

    def _receive_buffer(self, like: torch.Tensor) -> torch.Tensor:
        spare = self._spare
        if spare is not None and spare.shape == like.shape and spare.dtype == like.dtype:
            return spare
        return torch.empty_like(like, memory_format=torch.contiguous_format)

    def start(self, send_buf: torch.Tensor) -> None:
        if self._in_flight is not None:
            raise RuntimeError("RingExchange.start called twice without wait()")
        if self.size == 1:
            self._in_flight = ([], send_buf, send_buf)
            return
        send_buf = send_buf.contiguous()
        recv_buf = self._receive_buffer(send_buf)
        ops = [dist.P2POp(dist.isend, send_buf, self.next_rank, self.group, self.tag),
               dist.P2POp(dist.irecv, recv_buf, self.prev_rank, self.group, self.tag)]
        self._in_flight = (dist.batch_isend_irecv(ops), send_buf, recv_buf)
        self.link.add(nbytes(send_buf))

    def wait(self) -> torch.Tensor:
        if self._in_flight is None:
            raise RuntimeError("RingExchange.wait called without start()")
        requests, sent, received = self._in_flight
        for request in requests:
            request.wait()
        self._in_flight = None
        self._spare = sent if sent is not received else None
        return received


def all_to_all_dim0(x: torch.Tensor, group, link: Link) -> torch.Tensor:
    """Block i of dim 0 goes to group rank i; result block j came from group rank j."""
    world = dist.get_world_size(group)
    if x.shape[0] != world:
        raise ValueError(f"all_to_all: dim 0 is {x.shape[0]}, group size {world}")
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    link.add(nbytes(x) // world * (world - 1))  # the own block stays local
    return out
