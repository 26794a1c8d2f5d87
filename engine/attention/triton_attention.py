"""The Triton attention entry points: forward (triton_flash.py), backward
(triton_flash_bwd.py) and the autograd Function that joins them. Kept apart so that the
backward kernels import the forward module's device helpers without an import cycle."""
from __future__ import annotations

import torch

from engine.attention.triton_flash import triton_attention_forward
from engine.attention.triton_flash_bwd import attention_backward

__all__ = ["TritonFlashAttention", "triton_attention_backward", "triton_attention_forward"]


def triton_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              out: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float,
                              *, block_m: int | None = None, block_n: int | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the forward above: dq like q, dk/dv like k/v (summed over each kv head's q heads).

    `out`/`lse` may be the merged result of several key chunks (ring attention): each chunk's backward then
    yields its share of dq and its own dk/dv. lse is used as given, never recomputed.
    """
    return attention_backward(dout, q, k, v, out, lse, causal, scale, block_m=block_m, block_n=block_n)


class TritonFlashAttention(torch.autograd.Function):
    """Autograd wrapper: TritonFlashAttention.apply(q, k, v, causal, scale) -> out [b, s_q, n_q, d]."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        out, lse = triton_attention_forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = triton_attention_backward(dout, q, k, v, out, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None
