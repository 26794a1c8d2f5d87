"""CPU backend: torch's fused flash-attention kernels for CPU, which also return the LSE.

The ops take [b, n, s, d]. Their causal flag is top-left aligned when s_q != s_k, so bottom-right
causal with s_q < s_k goes through an additive mask instead (the block layer never passes
s_q > s_k with causal). They accept fewer kv heads than query heads (GQA) natively.
"""
from __future__ import annotations

import torch

from .math_backend import causal_mask

NAME = "cpu"
NATIVE_GQA = True


def is_available() -> bool:
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")


def _mask_and_flag(s_q: int, s_k: int, causal: bool, dtype, device):
    """(attn_mask, is_causal) giving bottom-right causal semantics on the top-left aligned op."""
    if not causal or s_q == s_k:
        return None, causal
    additive = torch.zeros(s_q, s_k, dtype=dtype, device=device)
    return additive.masked_fill(causal_mask(s_q, s_k, device), float("-inf")), False


def forward(q_bsnd, k_bsnd, v_bsnd, causal: bool, scale: float):
    mask, is_causal = _mask_and_flag(q_bsnd.shape[1], k_bsnd.shape[1], causal, q_bsnd.dtype, q_bsnd.device)
    out_bnsd, lse_bns = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q_bsnd.transpose(1, 2), k_bsnd.transpose(1, 2), v_bsnd.transpose(1, 2), 0.0, is_causal,
        attn_mask=mask, scale=scale)
    return out_bnsd.transpose(1, 2), lse_bns


def backward(dout_bsnd, q_bsnd, k_bsnd, v_bsnd, out_bsnd, lse_bns, causal: bool, scale: float):
    mask, is_causal = _mask_and_flag(q_bsnd.shape[1], k_bsnd.shape[1], causal, q_bsnd.dtype, q_bsnd.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout_bsnd.transpose(1, 2), q_bsnd.transpose(1, 2), k_bsnd.transpose(1, 2),
        v_bsnd.transpose(1, 2), out_bsnd.transpose(1, 2), lse_bns.contiguous(), 0.0, is_causal,
        attn_mask=mask, scale=scale)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
