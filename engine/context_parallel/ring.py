"""Ring attention (LightSeq, arXiv 2310.03294) over zigzag-sharded tokens, as one autograd Function.

Forward: K/V (kv heads only, packed as one [2, b, s, n_kv, d] message) travel one hop per step;
the send of the next step is posted before the block of the current step is computed, so the
transfer overlaps the compute. Partial results are merged in fp32 with the stable form
lse = lse - logsigmoid(lse - lse_b), out = out - sigmoid(lse_b - lse) * (out - out_b).

Backward: K/V travel the ring again; dq accumulates locally in fp32, the fp32 dK/dV accumulator of
each K/V block travels with it, collecting every rank's share, and reaches its home rank after
`cp` hops. The Function saves (q, k, v, out, lse), so backward never re-runs the forward or its
communication.

Causal zigzag plan (rank r holds chunks r and 2cp-1-r; K/V of step i come from rank j = r - i):
j == r: both halves, diagonal causal; j < r: all queries vs the first K/V half (no mask);
j > r: the second query half vs all K/V (no mask). Other (query, key) pairs are fully masked
and skipped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.attention.block import block_backward
from engine.attention.core import AttentionCounters, counted_block_forward
from engine.parallel.traffic import Link

from .comm import GRAD_TAG, KV_TAG, RingExchange

ALL = slice(None)


@dataclass
class RingSpec:
    group: object
    ranks: list[int]
    position: int
    causal: bool
    scale: float
    backend: str
    counters: AttentionCounters   # block-forward calls (remat-aware checkpointing checks)
    link: Link                    # where the ring's bytes are counted

    @property
    def size(self) -> int:
        return len(self.ranks)


def step_plan(step: int, position: int, size: int, causal: bool, local_len: int):
    """(query slice, key slice, causal flag) of the block computed at `step`, on the seq dim."""
    if not causal:
        return ALL, ALL, False
    source = (position - step) % size
    half = local_len // 2
    if source == position:
        return ALL, ALL, True
    if source < position:
        return ALL, slice(0, half), False
    return slice(half, None), ALL, False


def merge_partials(out_bsnd, lse_bns, out_b_bsnd, lse_b_bns):
    """Combine two softmax partials over disjoint key sets; fp32, safe for lse_b = -inf rows."""
    lse_b = lse_b_bns.float()
    weight_b_bsn1 = torch.sigmoid(lse_b - lse_bns).transpose(1, 2).unsqueeze(-1)
    merged_out = out_bsnd - weight_b_bsn1 * (out_bsnd - out_b_bsnd.float())
    merged_lse = lse_bns - F.logsigmoid(lse_bns - lse_b)
    # An empty partial (lse = -inf) on the left would give -inf - -inf = nan: take the other one.
    merged_lse = torch.where(torch.isneginf(lse_bns), lse_b, merged_lse)
    return merged_out, merged_lse


def _kv_slices(kv_2bsnd, keys: slice):
    return kv_2bsnd[0][:, keys], kv_2bsnd[1][:, keys]


def ring_forward(q_bsnd, k_bsnd, v_bsnd, spec: RingSpec):
    ring = RingExchange(spec.group, spec.ranks, spec.position, spec.link, tag=KV_TAG)
    kv = torch.stack((k_bsnd, v_bsnd))
    out_acc = lse_acc = None
    for step in range(spec.size):
        if step + 1 < spec.size:
            ring.start(kv)  # overlap: next block's K/V move while this one is computed
        queries, keys, causal = step_plan(step, spec.position, spec.size, spec.causal, q_bsnd.shape[1])
        k_blk, v_blk = _kv_slices(kv, keys)
        out_b, lse_b = counted_block_forward(spec.counters, q_bsnd[:, queries], k_blk, v_blk,
                                             causal=causal, scale=spec.scale, backend=spec.backend)
        if out_acc is None:  # step 0 always covers every query row
            out_acc, lse_acc = out_b.float(), lse_b.float()
        else:
            merged_out, merged_lse = merge_partials(out_acc[:, queries], lse_acc[..., queries], out_b, lse_b)
            out_acc[:, queries], lse_acc[..., queries] = merged_out, merged_lse
        if step + 1 < spec.size:
            kv = ring.wait()
    return out_acc.to(q_bsnd.dtype), lse_acc


def ring_backward(dout_bsnd, q_bsnd, k_bsnd, v_bsnd, out_bsnd, lse_bns, spec: RingSpec):
    kv_ring = RingExchange(spec.group, spec.ranks, spec.position, spec.link, tag=KV_TAG)
    grad_ring = RingExchange(spec.group, spec.ranks, spec.position, spec.link, tag=GRAD_TAG)
    kv = torch.stack((k_bsnd, v_bsnd))
    dq_acc = torch.zeros(q_bsnd.shape, dtype=torch.float32, device=q_bsnd.device)
    for step in range(spec.size):
        if step + 1 < spec.size:
            kv_ring.start(kv)
        queries, keys, causal = step_plan(step, spec.position, spec.size, spec.causal, q_bsnd.shape[1])
        k_blk, v_blk = _kv_slices(kv, keys)
        dq_b, dk_b, dv_b = block_backward(dout_bsnd[:, queries], q_bsnd[:, queries], k_blk, v_blk,
                                          out_bsnd[:, queries], lse_bns[..., queries], causal=causal,
                                          scale=spec.scale, backend=spec.backend)
        dq_acc[:, queries] += dq_b
        # The accumulator of the K/V block held now arrives from the previous rank.
        dkv_acc = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device) if step == 0 else grad_ring.wait()
        dkv_acc[0][:, keys] += dk_b
        dkv_acc[1][:, keys] += dv_b
        grad_ring.start(dkv_acc)
        if step + 1 < spec.size:
            kv = kv_ring.wait()
    dkv_home = grad_ring.wait()  # cp-th hop: the accumulator of this rank's own K/V
    return dq_acc.to(q_bsnd.dtype), dkv_home[0].to(k_bsnd.dtype), dkv_home[1].to(v_bsnd.dtype)


class RingAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_bsnd, k_bsnd, v_bsnd, spec: RingSpec):
        out_bsnd, lse_bns = ring_forward(q_bsnd, k_bsnd, v_bsnd, spec)
        ctx.save_for_backward(q_bsnd, k_bsnd, v_bsnd, out_bsnd, lse_bns)
        ctx.spec = spec
        return out_bsnd

    @staticmethod
    def backward(ctx, dout_bsnd):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout_bsnd.contiguous(), q, k, v, out, lse, ctx.spec)
        return dq, dk, dv, None
