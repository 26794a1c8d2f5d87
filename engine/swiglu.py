"""The SwiGLU activation silu(g) * u (Shazeer, arXiv 2002.05202) with less saved for backward.

Autograd's two ops keep g (for silu), silu(g) and u (for the product): three [rows, F]
tensors, and the down projection keeps the product, a fourth. `swiglu` keeps g and u only
and recomputes silu(g) in backward (one elementwise pass). The gradients are torch's own
kernels on the same operands (mul, then aten.silu_backward), so they are bit-identical to
autograd's. engine/moe/experts.py goes one step further for the experts and recomputes the
product for the down GEMM's weight gradient too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_grads(gate: torch.Tensor, up: torch.Tensor, d_act: torch.Tensor,
                 silu_gate: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(d gate, d up) of act = silu(gate) * up, given d act, as autograd computes them."""
    if silu_gate is None:
        silu_gate = F.silu(gate)
    d_up = d_act * silu_gate
    d_gate = torch.ops.aten.silu_backward(d_act * up, gate)
    return d_gate, d_up


class SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, d_act):
        gate, up = ctx.saved_tensors
        return swiglu_grads(gate, up, d_act)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, keeping only gate and up for backward."""
    return SwiGLU.apply(gate, up)
