"""Bytes each rank sends per axis, and the link each group crosses.

Bytes match what the engine's counters report (the mesh's Traffic, engine/parallel/traffic.py):
- TP + SP: every all-gather / reduce-scatter of [b, s/cp, h] sends (tp-1)/tp of it per rank
  (Megatron's 2 + 2 per layer and pass, engine/tensor_parallel/plan.py); a MoE layer
  without shared experts has no TP collective in its FFN (the router and experts read
  the sequence-parallel tokens);
- CP ring (LightSeq): K/V of the local tokens (kv heads of this TP rank) make cp - 1 hops
  forward and again backward, plus cp hops of the fp32 dK/dV accumulators
  (= engine.context_parallel.volume.ring_bytes, checked in the tests);
- EP all-to-all: the (ep-1)/ep of the assigned rows that leave the rank, once to dispatch
  and once to combine; ETP adds an all-gather and a reduce-scatter of the received rows
  over etp (engine/moe/dispatcher_alltoall.py); the all-gather dispatcher gathers every
  token of the etp x ep group and reduce-scatters the outputs (dispatcher_allgather.py);
- PP: one [b, s/(cp·tp), h] activation forward and its gradient backward per chunk boundary;
- DP: fp32 gradients, ring all-reduce 2(n-1)/n, or under ZeRO-1 reduce-scatter (n-1)/n plus
  the all-gather of the updated params in the model dtype (engine/optim/flat_bucket.py).

Links, from the rank order (engine/parallel/ranks.py: attention tp-cp-dp-pp, MoE
etp-ep-edp-pp, first axis stride 1) and gpus_per_node: a group whose ranks span at most one
node's worth of consecutive ranks stays on NVLink; otherwise the part of its traffic that
goes to other nodes crosses the network cards (one per GPU): an all-to-all's off-node share
through each rank's own NIC, a ring's node crossing through the NICs of all the group's
members on that node.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.parallel.traffic import ring_gather_fraction


@dataclass(frozen=True)
class Link:
    intra_bytes_per_s: float      # per GPU per direction, inside a node (NVLink)
    inter_bytes_per_s: float      # per GPU per direction, to other nodes (its NIC)
    gpus_per_node: int

    def members_per_node(self, size: int, stride: int) -> int:
        """Ranks of a group (consecutive members `stride` apart) that share a node."""
        return min(size, max(1, self.gpus_per_node // stride))

    def ring_time(self, nbytes: float, size: int, stride: int) -> float:
        """A ring collective in which each rank sends `nbytes` to its neighbour. A ring that
        leaves the node crosses each node boundary once: `nbytes` leave every node there,
        and NCCL spreads that crossing over its channels, one per member GPU of the node
        with its own NIC (rail-aligned rings), so the boundary carries g NICs' worth, g the
        members per node (g = 1: one NIC's pace)."""
        if nbytes <= 0 or size == 1:
            return 0.0
        per_node = self.members_per_node(size, stride)
        if per_node == size:
            return nbytes / self.intra_bytes_per_s
        return nbytes / min(self.intra_bytes_per_s, per_node * self.inter_bytes_per_s)

    def a2a_time(self, nbytes: float, size: int, stride: int) -> float:
        """An all-to-all in which each rank sends `nbytes` spread evenly over its size - 1
        peers: the on-node and off-node parts go in parallel over NVLink and the NIC."""
        if nbytes <= 0 or size == 1:
            return 0.0
        on_share = (self.members_per_node(size, stride) - 1) / (size - 1)
        return max(nbytes * on_share / self.intra_bytes_per_s,
                   nbytes * (1 - on_share) / self.inter_bytes_per_s)




def tp_collective_bytes(tokens: int, hidden: int, act_bytes: int, tp: int) -> float:
    """One all-gather or reduce-scatter of [tokens, hidden] over TP."""
    return ring_gather_fraction(tp) * tokens * hidden * act_bytes


def a2a_bytes(assigned_rows: int, hidden: int, act_bytes: int, ep: int, etp: int) -> float:
    """All-to-all dispatcher, one MoE layer, one pass: dispatch + combine over EP, and the
    ETP all-gather + reduce-scatter of the received rows."""
    over_ep = 2 * ring_gather_fraction(ep) * assigned_rows * hidden * act_bytes
    over_etp = 2 * (etp - 1) * assigned_rows * hidden * act_bytes
    return over_ep + over_etp


def allgather_dispatch_bytes(sp_tokens: int, hidden: int, act_bytes: int, group: int) -> float:
    """All-gather dispatcher, one MoE layer, one pass: gather of the tokens + reduce-scatter."""
    return 2 * (group - 1) * sp_tokens * hidden * act_bytes


def dp_bytes(grad_elems: float, param_bytes: int, n: int, zero1: bool) -> float:
    """Gradient reduction (fp32) and, with ZeRO-1, the parameter all-gather."""
    if n == 1:
        return 0.0
    if zero1:
        return ring_gather_fraction(n) * grad_elems * (4 + param_bytes)
    return 2 * ring_gather_fraction(n) * grad_elems * 4
