"""One attention block with its log-sum-exp: the unit that ring/Ulysses attention is built from.

Conventions every backend is normalised to:
- layout [b, s, n, d]; K/V may have fewer heads than Q (GQA/MQA, n_q % n_kv == 0);
- causal is bottom-right aligned (query i sees keys j <= i + s_k - s_q), as in flash-attn;
- fully masked rows (causal with s_q > s_k) give out = 0 and lse = -inf, so that the merge
  lse = lse - logsigmoid(lse - lse_b) leaves the other block untouched; backends never see them;
- lse is float32 [b, n, s_q];
- block_backward takes the *global* (merged) out and lse, as flash-attn's backward does, so the
  gradient of one key block is its exact share of the full softmax.
"""
from __future__ import annotations

import torch

from .backends import resolve_backend


def _check_shapes(q_bsnd, k_bsnd, v_bsnd) -> None:
    if q_bsnd.dim() != 4 or k_bsnd.shape != v_bsnd.shape:
        raise ValueError(f"attention block: expected q [b,s,n,d] and equal k/v shapes, got "
                         f"{tuple(q_bsnd.shape)}, {tuple(k_bsnd.shape)}, {tuple(v_bsnd.shape)}")
    b, _, n_q, d = q_bsnd.shape
    if k_bsnd.shape[0] != b or k_bsnd.shape[3] != d or n_q % k_bsnd.shape[2]:
        raise ValueError(f"attention block: k/v {tuple(k_bsnd.shape)} do not fit q {tuple(q_bsnd.shape)} "
                         "(batch and head dim must match, q heads a multiple of kv heads)")
    if k_bsnd.shape[1] == 0:
        raise ValueError("attention block: empty key block")


def expand_kv_heads(kv_bsnd: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    group = num_q_heads // kv_bsnd.shape[2]
    return kv_bsnd if group == 1 else kv_bsnd.repeat_interleave(group, dim=2)


def reduce_kv_heads(dkv_bsnd: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Inverse of expand_kv_heads for gradients: sum over each GQA group of query heads."""
    b, s, n, d = dkv_bsnd.shape
    if n == num_kv_heads:
        return dkv_bsnd
    return dkv_bsnd.view(b, s, num_kv_heads, n // num_kv_heads, d).sum(dim=3)


def _masked_rows(q_bsnd, k_bsnd, causal: bool) -> int:
    """Leading query rows that see no key under bottom-right causal alignment."""
    return max(q_bsnd.shape[1] - k_bsnd.shape[1], 0) if causal else 0


def block_forward(q_bsnd, k_bsnd, v_bsnd, *, causal: bool, scale: float, backend: str = "auto"):
    """(out_bsnd in q's dtype, lse_bns float32) of softmax(q k^T * scale) v over this key block."""
    _check_shapes(q_bsnd, k_bsnd, v_bsnd)
    impl = resolve_backend(backend, q_bsnd.device, q_bsnd.dtype, q_bsnd.shape[-1])
    skip = _masked_rows(q_bsnd, k_bsnd, causal)
    q_live = q_bsnd[:, skip:]
    if not impl.NATIVE_GQA:
        k_bsnd, v_bsnd = (expand_kv_heads(t, q_bsnd.shape[2]) for t in (k_bsnd, v_bsnd))
    out_live, lse_live = impl.forward(q_live, k_bsnd, v_bsnd, causal, scale)
    lse_live = lse_live[..., : q_live.shape[1]].float()
    # flash-attn marks empty rows with +inf; everywhere else in foldmoe they are -inf.
    lse_live = lse_live.masked_fill(torch.isposinf(lse_live), float("-inf"))
    if skip == 0:
        return out_live, lse_live
    out = out_live.new_zeros(q_bsnd.shape)
    out[:, skip:] = out_live
    lse = lse_live.new_full(q_bsnd.shape[:1] + q_bsnd.shape[2:3] + q_bsnd.shape[1:2], float("-inf"))
    lse[..., skip:] = lse_live
    return out, lse


def block_backward(dout_bsnd, q_bsnd, k_bsnd, v_bsnd, out_bsnd, lse_bns, *, causal: bool, scale: float,
                   backend: str = "auto"):
    """(dq, dk, dv) of this key block, given the global out and lse of the rows of q."""
    _check_shapes(q_bsnd, k_bsnd, v_bsnd)
    impl = resolve_backend(backend, q_bsnd.device, q_bsnd.dtype, q_bsnd.shape[-1])
    skip = _masked_rows(q_bsnd, k_bsnd, causal)
    num_kv_heads = k_bsnd.shape[2]
    if not impl.NATIVE_GQA:
        k_bsnd, v_bsnd = (expand_kv_heads(t, q_bsnd.shape[2]) for t in (k_bsnd, v_bsnd))
    dq_live, dk, dv = impl.backward(dout_bsnd[:, skip:], q_bsnd[:, skip:], k_bsnd, v_bsnd,
                                    out_bsnd[:, skip:], lse_bns[..., skip:], causal, scale)
    dk, dv = reduce_kv_heads(dk, num_kv_heads), reduce_kv_heads(dv, num_kv_heads)
    if skip == 0:
        return dq_live, dk, dv
    dq = dq_live.new_zeros(q_bsnd.shape)
    dq[:, skip:] = dq_live
    return dq, dk, dv
