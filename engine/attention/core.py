"""LocalAttention: the cp=1 attention core, built from the same block functions as the CP cores.

The autograd Function saves (q, k, v, out, lse), so backward calls block_backward only and never
re-runs the forward (LightSeq's rematerialization-aware checkpointing relies on this).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .block import block_backward, block_forward


@dataclass
class AttentionCounters:
    """Block-forward calls of one attention core, forward and backward together (its bytes
    go to the mesh's Traffic)."""

    block_forward_calls: int = 0

    def reset(self) -> None:
        self.block_forward_calls = 0


def counted_block_forward(counters: AttentionCounters, q_bsnd, k_bsnd, v_bsnd, *, causal, scale, backend):
    counters.block_forward_calls += 1
    return block_forward(q_bsnd, k_bsnd, v_bsnd, causal=causal, scale=scale, backend=backend)


def default_scale(q_bsnd: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q_bsnd.shape[-1]) if scale is None else scale


class LocalAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_bsnd, k_bsnd, v_bsnd, causal: bool, scale: float, backend: str,
                counters: AttentionCounters):
        out_bsnd, lse_bns = counted_block_forward(counters, q_bsnd, k_bsnd, v_bsnd, causal=causal,
                                                  scale=scale, backend=backend)
        ctx.save_for_backward(q_bsnd, k_bsnd, v_bsnd, out_bsnd, lse_bns)
        ctx.options = (causal, scale, backend)
        return out_bsnd

    @staticmethod
    def backward(ctx, dout_bsnd):
        causal, scale, backend = ctx.options
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = block_backward(dout_bsnd, q, k, v, out, lse, causal=causal, scale=scale, backend=backend)
        return dq, dk, dv, None, None, None, None


class CountedAttention(nn.Module):
    """Base of the attention cores: exposes the counters as module attributes."""

    def __init__(self):
        super().__init__()
        self.counters = AttentionCounters()

    @property
    def block_forward_calls(self) -> int:
        return self.counters.block_forward_calls

    def reset_counters(self) -> None:
        self.counters.reset()


class LocalAttention(CountedAttention):
    """forward(q [b,s,n_q,d], k/v [b,s,n_kv,d]) -> out [b,s,n_q,d]; causal LM attention by default."""

    def __init__(self, backend: str = "auto", *, causal: bool = True, scale: float | None = None):
        super().__init__()
        self.backend, self.causal, self.scale = backend, causal, scale

    def forward(self, q_bsnd, k_bsnd, v_bsnd):
        return LocalAttentionFunction.apply(q_bsnd, k_bsnd, v_bsnd, self.causal,
                                            default_scale(q_bsnd, self.scale), self.backend, self.counters)
