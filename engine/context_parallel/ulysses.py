"""Ulysses all-to-all (DeepSpeed-Ulysses, arXiv 2309.14509): sequence-sharded <-> head-sharded.

seq_to_heads turns this rank's zigzag tokens of all heads, [b, s/P, H, d], into the group's tokens
of H/P heads, [b, s, H/P, d], in true sequence order (the causal mask needs it); heads_to_seq is
its exact inverse, so each is the other's backward. Q, K and V travel in one packed all-to-all.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import gcd
from typing import NamedTuple

import torch

from engine.parallel.traffic import Link

from .comm import all_to_all_dim0
from .zigzag import gathered_to_true_order


class ReorderIndex(NamedTuple):
    """Gathers between the received blocks [P, b, s_local, ...] and true sequence order."""
    block_s: torch.Tensor      # true position t lives in block block_s[t] ...
    row_s: torch.Tensor        # ... at row row_s[t]
    position_ps: torch.Tensor  # [P, 1, s_local]: the true position of block p, row j


@dataclass
class AllToAllSpec:
    group: object
    size: int
    link: Link     # where the all-to-all bytes are counted
    reorder: bool  # zigzag shards -> true order (needed for causal masks)
    _index: dict = field(default_factory=dict, repr=False)

    def index(self, local_len: int, device) -> ReorderIndex | None:
        """The reorder gathers' indices, built once per (length, device): no index
        arithmetic and no host-to-device copy per call."""
        if not self.reorder:
            return None
        key = (local_len, str(device))
        if key not in self._index:
            order = gathered_to_true_order(self.size, local_len)
            self._index[key] = ReorderIndex(
                (order // local_len).to(device), (order % local_len).to(device),
                torch.argsort(order).view(self.size, 1, local_len).to(device))
        return self._index[key]


def _seq_to_heads(x_bshd, spec: AllToAllSpec):
    b, s_local, heads, d = x_bshd.shape
    # [dest, b, s_local, H/P, d]: head group p goes to group rank p.
    x_pbshd = x_bshd.view(b, s_local, spec.size, heads // spec.size, d).permute(2, 0, 1, 3, 4)
    y_pbshd = all_to_all_dim0(x_pbshd, spec.group, spec.link)  # dim 0 is now the source rank
    y_bpshd = y_pbshd.permute(1, 0, 2, 3, 4)                   # a view
    index = spec.index(s_local, x_bshd.device)
    if index is None:
        return y_bpshd.reshape(b, spec.size * s_local, heads // spec.size, d)
    # One gather into true order straight from the received blocks (no batch-major copy
    # first at b > 1).
    return y_bpshd[:, index.block_s, index.row_s]


def _heads_to_seq(y_bshd, spec: AllToAllSpec):
    b, s_group, heads_local, d = y_bshd.shape
    s_local = s_group // spec.size
    index = spec.index(s_local, y_bshd.device)
    if index is None:
        y_pbshd = y_bshd.view(b, spec.size, s_local, heads_local, d).permute(1, 0, 2, 3, 4)
    else:
        # One gather from true order into the contiguous send blocks [dest, b, s_local, ...]
        # (all_to_all_dim0 then has nothing to pack).
        batch = torch.arange(b, device=y_bshd.device).view(1, b, 1)
        y_pbshd = y_bshd[batch, index.position_ps]
    x_pbshd = all_to_all_dim0(y_pbshd, spec.group, spec.link)  # dim 0: head group
    return x_pbshd.permute(1, 2, 0, 3, 4).reshape(b, s_local, spec.size * heads_local, d)


class SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_bshd, spec: AllToAllSpec):
        ctx.spec = spec
        return _seq_to_heads(x_bshd, spec)

    @staticmethod
    def backward(ctx, grad_bshd):
        return _heads_to_seq(grad_bshd.contiguous(), ctx.spec), None


class HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_bshd, spec: AllToAllSpec):
        ctx.spec = spec
        return _heads_to_seq(y_bshd, spec)

    @staticmethod
    def backward(ctx, grad_bshd):
        return _seq_to_heads(grad_bshd.contiguous(), ctx.spec), None


def kv_replication(num_q_heads: int, num_kv_heads: int, a2a_size: int) -> int:
    """Factor by which kv heads are repeated so every a2a rank gets the kv heads its q heads use."""
    if num_q_heads % a2a_size:
        raise ValueError(f"Ulysses: {num_q_heads} local query heads are not divisible by the "
                         f"all-to-all size {a2a_size}")
    factor = a2a_size // gcd(num_kv_heads, a2a_size)
    if (num_q_heads // num_kv_heads) % factor:
        raise ValueError(f"Ulysses: {num_kv_heads} kv heads cannot be split over {a2a_size} ranks "
                         f"with {num_q_heads} query heads")
    return factor


def scatter_heads(q_bsnd, k_bsnd, v_bsnd, spec: AllToAllSpec):
    """One packed all-to-all for q, k, v; returns the head-sharded full-sequence (q, k, v)."""
    factor = kv_replication(q_bsnd.shape[2], k_bsnd.shape[2], spec.size)
    if factor > 1:  # MQA/GQA with fewer kv heads than ranks; autograd sums the copies' grads
        k_bsnd, v_bsnd = (t.repeat_interleave(factor, dim=2) for t in (k_bsnd, v_bsnd))
    b, s_local, _, d = q_bsnd.shape
    per_rank = [t.reshape(b, s_local, spec.size, t.shape[2] // spec.size, d) for t in (q_bsnd, k_bsnd, v_bsnd)]
    packed_bshd = torch.cat(per_rank, dim=3).flatten(2, 3)  # heads grouped by destination rank
    gathered_bshd = SeqToHeads.apply(packed_bshd, spec)
    sizes = [t.shape[3] for t in per_rank]
    return gathered_bshd.split(sizes, dim=2)


def gather_heads(out_bshd, spec: AllToAllSpec):
    return HeadsToSeq.apply(out_bshd, spec)
