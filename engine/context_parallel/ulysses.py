"""Ulysses all-to-all (DeepSpeed-Ulysses, arXiv 2309.14509): sequence-sharded <-> head-sharded.

seq_to_heads turns this rank's zigzag tokens of all heads, [b, s/P, H, d], into the group's tokens
of H/P heads, [b, s, H/P, d], in true sequence order (the causal mask needs it); heads_to_seq is
its exact inverse, so each is the other's backward. Q, K and V travel in one packed all-to-all.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import gcd

import torch

from engine.parallel.traffic import Link

from .comm import all_to_all_dim0
from .zigzag import gathered_to_true_order


@dataclass
class AllToAllSpec:
    group: object
    size: int
    link: Link     # where the all-to-all bytes are counted
    reorder: bool  # zigzag shards -> true order (needed for causal masks)

    def order(self, local_len: int, device) -> torch.Tensor | None:
        if not self.reorder:
            return None
        return gathered_to_true_order(self.size, local_len).to(device)


def _seq_to_heads(x_bshd, spec: AllToAllSpec):
    b, s_local, heads, d = x_bshd.shape
    # [dest, b, s_local, H/P, d]: head group p goes to group rank p.
    x_pbshd = x_bshd.view(b, s_local, spec.size, heads // spec.size, d).permute(2, 0, 1, 3, 4)
    y_pbshd = all_to_all_dim0(x_pbshd, spec.group, spec.link)  # dim 0 is now the source rank
    y_bshd = y_pbshd.permute(1, 0, 2, 3, 4).reshape(b, spec.size * s_local, heads // spec.size, d)
    order = spec.order(s_local, x_bshd.device)
    return y_bshd if order is None else y_bshd.index_select(1, order)


def _heads_to_seq(y_bshd, spec: AllToAllSpec):
    b, s_group, heads_local, d = y_bshd.shape
    s_local = s_group // spec.size
    order = spec.order(s_local, y_bshd.device)
    if order is not None:
        y_bshd = y_bshd.index_select(1, torch.argsort(order))
    y_pbshd = y_bshd.view(b, spec.size, s_local, heads_local, d).permute(1, 0, 2, 3, 4)
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
