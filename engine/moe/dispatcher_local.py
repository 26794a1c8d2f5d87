"""Local token dispatcher (EP = 1) and the permute/combine steps every dispatcher shares.

A dispatcher is called as `dispatcher(x_th, assignments, experts) -> y_th`. The
assignments already hold the one sort from tokens to expert-major order (token_n, see
assignment.py); permuting is a gather along it and combining (unpermuting) is the
weighted scatter-add back, so no dispatcher loops over experts or ranks in Python. The
local dispatcher makes no host read: the grouped experts take the counts as a device
tensor, and dropped slots at the tail come back as zeros with weight 0.
"""
from __future__ import annotations

import torch
from torch import nn

from .assignment import Assignments
from .experts import GroupedExperts


def permute_tokens(x_th: torch.Tensor, token_n: torch.Tensor) -> torch.Tensor:
    """[T, h] -> [N, h]: one row per assignment, in assignment (= expert) order."""
    return x_th.index_select(0, token_n)


class _Combine(torch.autograd.Function):
    """Weighted scatter-add in fp32 that keeps y in its own dtype for backward: autograd
    would keep the fp32 copy y.float() (4 bytes an element where y has 2 in bf16). The
    backward runs the ops autograd would (index_select, mul, sum), so it is bit-identical."""

    @staticmethod
    def forward(ctx, y_nh, token_n, prob_n, num_tokens: int):
        prob_n1 = prob_n.float().unsqueeze(-1)
        ctx.save_for_backward(y_nh, token_n, prob_n1)
        ctx.prob_dtype = prob_n.dtype
        out_th = torch.zeros(num_tokens, y_nh.shape[-1], dtype=torch.float32, device=y_nh.device)
        return out_th.index_add_(0, token_n, y_nh.float() * prob_n1).to(y_nh.dtype)

    @staticmethod
    def backward(ctx, d_out_th):
        y_nh, token_n, prob_n1 = ctx.saved_tensors
        d_weighted_nh = d_out_th.float().index_select(0, token_n)
        d_y = (d_weighted_nh * prob_n1).to(y_nh.dtype) if ctx.needs_input_grad[0] else None
        d_prob = None
        if ctx.needs_input_grad[2]:
            d_prob = (d_weighted_nh * y_nh.float()).sum(-1).to(ctx.prob_dtype)
        return d_y, None, d_prob, None


def combine_tokens(y_nh: torch.Tensor, token_n: torch.Tensor, prob_n: torch.Tensor,
                   num_tokens: int) -> torch.Tensor:
    """[N, h] -> [T, h]: sum_k prob * expert output for every token (unpermute).
    Weighted and summed in fp32 so bf16 runs do not round each of the k terms."""
    return _Combine.apply(y_nh, token_n, prob_n, num_tokens)


class LocalDispatcher(nn.Module):
    """All experts on this rank; no communication."""

    def forward(self, x_th: torch.Tensor, assign: Assignments, experts: GroupedExperts) -> torch.Tensor:
        x_nh = permute_tokens(x_th, assign.token_n)
        y_nh = experts(x_nh, assign.counts_e, has_tail=assign.has_tail)
        return combine_tokens(y_nh, assign.token_n, assign.prob_n, x_th.shape[0])
