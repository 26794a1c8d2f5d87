"""Backward of the Triton FlashAttention-2 kernels in triton_flash.py (Dao, arXiv 2307.08691, Alg. 2).

Three kernels, no atomics, so results are bitwise deterministic:
1. delta = rowsum(dout * out) per query row (fp32), the softmax-Jacobian term D_i of FA2.
2. dk/dv: one program per (key block, batch * kv head); loops over the kv head's q heads and their query
   blocks, so GQA/MQA groups are summed in registers.
3. dq: one program per (query block, batch * q head); loops over key blocks.
With P = exp(scale * q k^T - lse) (masked): dv = P^T dout, dP = dout v^T, dS = P * (dP - delta),
dq = scale * dS k, dk = scale * dS^T q. lse comes from the caller (possibly a ring-merged global lse).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.attention.triton_flash import (
    LOG2E, _dot, _key_end, _load_rows, _store_rows, _visible, bshd_strides, check_attention_inputs,
    dense_last_dim, dot_in_fp32, is_interpreted, launch_config,
)


@triton.jit
def _attn_bwd_delta_kernel(
    out_ptr, dout_ptr, delta_ptr, stride_ob, stride_os, stride_oh, stride_db, stride_ds, stride_dh,
    n_q_heads, seqlen_q, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    batch = (tl.program_id(1) // n_q_heads).to(tl.int64)
    head = (tl.program_id(1) % n_q_heads).to(tl.int64)
    out_base = out_ptr + batch * stride_ob + head * stride_oh
    dout_base = dout_ptr + batch * stride_db + head * stride_dh
    out_md = _load_rows(out_base, start_m, BLOCK_M, stride_os, seqlen_q, HEAD_DIM)
    dout_md = _load_rows(dout_base, start_m, BLOCK_M, stride_ds, seqlen_q, HEAD_DIM)
    delta_m = tl.sum(out_md.to(tl.float32) * dout_md.to(tl.float32), 1)
    tl.store(delta_ptr + (batch * n_q_heads + head) * seqlen_q + rows, delta_m, mask=rows < seqlen_q)


@triton.jit
def _load_row_stats(lse_ptr, delta_ptr, rows, seqlen_q):
    """lse in log2 units and delta. Rows that see no key have no visible score, so P = 0 there whatever
    their lse marker is (-inf here, +inf in flash-attn 2, 0 in torch's CPU op)."""
    in_range = rows < seqlen_q
    lse_m = tl.load(lse_ptr + rows, mask=in_range, other=0.0) * 1.4426950408889634  # * log2(e)
    delta_m = tl.load(delta_ptr + rows, mask=in_range, other=0.0)
    return lse_m, delta_m


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_db, stride_ds, stride_dh, stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
    n_kv_heads, group_size, seqlen_q, seqlen_k, qk_scale_log2, sm_scale,
    CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    batch = (tl.program_id(1) // n_kv_heads).to(tl.int64)
    kv_head = (tl.program_id(1) % n_kv_heads).to(tl.int64)
    cols = start_n + tl.arange(0, BLOCK_N)
    k_nd = _load_rows(k_ptr + batch * stride_kb + kv_head * stride_kh, start_n, BLOCK_N, stride_ks, seqlen_k,
                      HEAD_DIM)
    v_nd = _load_rows(v_ptr + batch * stride_vb + kv_head * stride_vh, start_n, BLOCK_N, stride_vs, seqlen_k,
                      HEAD_DIM)
    dk_nd = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv_nd = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

    first_row = 0
    if CAUSAL:  # earliest query that sees key start_n (bottom-right mask), rounded down to a block
        first_row = tl.maximum(start_n - (seqlen_k - seqlen_q), 0) // BLOCK_M * BLOCK_M
    for member in range(0, group_size):  # the q heads that read this kv head
        head = kv_head * group_size + member
        q_base = q_ptr + batch * stride_qb + head * stride_qh
        dout_base = dout_ptr + batch * stride_db + head * stride_dh
        stats_offset = (batch * n_kv_heads * group_size + head) * seqlen_q
        for start_m in range(first_row, seqlen_q, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            q_md = _load_rows(q_base, start_m, BLOCK_M, stride_qs, seqlen_q, HEAD_DIM)
            dout_md = _load_rows(dout_base, start_m, BLOCK_M, stride_ds, seqlen_q, HEAD_DIM)
            lse_m, delta_m = _load_row_stats(lse_ptr + stats_offset, delta_ptr + stats_offset, rows, seqlen_q)
            # Transposed tiles [keys, queries] so dk/dv accumulate without transposing P.
            s_nm = _dot(k_nd, tl.trans(q_md), DOT_FP32) * qk_scale_log2
            visible = _visible(rows[None, :], cols[:, None], seqlen_q, seqlen_k, CAUSAL)
            p_nm = tl.where(visible, tl.exp2(s_nm - lse_m[None, :]), 0.0)
            dv_nd += _dot(p_nm.to(dout_md.dtype), dout_md, DOT_FP32)
            dp_nm = _dot(v_nd, tl.trans(dout_md), DOT_FP32)
            ds_nm = p_nm * (dp_nm - delta_m[None, :])
            dk_nd += _dot(ds_nm.to(q_md.dtype), q_md, DOT_FP32)

    _store_rows(dk_ptr + batch * stride_dkb + kv_head * stride_dkh, start_n, BLOCK_N, stride_dks, seqlen_k,
                dk_nd * sm_scale, HEAD_DIM)
    _store_rows(dv_ptr + batch * stride_dvb + kv_head * stride_dvh, start_n, BLOCK_N, stride_dvs, seqlen_k,
                dv_nd, HEAD_DIM)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_db, stride_ds, stride_dh, stride_dqb, stride_dqs, stride_dqh,
    n_q_heads, group_size, seqlen_q, seqlen_k, qk_scale_log2, sm_scale,
    CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    batch = (tl.program_id(1) // n_q_heads).to(tl.int64)
    head = (tl.program_id(1) % n_q_heads).to(tl.int64)
    kv_head = head // group_size
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh
    rows = start_m + tl.arange(0, BLOCK_M)
    q_md = _load_rows(q_ptr + batch * stride_qb + head * stride_qh, start_m, BLOCK_M, stride_qs, seqlen_q,
                      HEAD_DIM)
    dout_md = _load_rows(dout_ptr + batch * stride_db + head * stride_dh, start_m, BLOCK_M, stride_ds, seqlen_q,
                         HEAD_DIM)
    stats_offset = (batch * n_q_heads + head) * seqlen_q
    lse_m, delta_m = _load_row_stats(lse_ptr + stats_offset, delta_ptr + stats_offset, rows, seqlen_q)
    dq_md = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    key_end = _key_end(start_m, BLOCK_M, seqlen_q, seqlen_k, CAUSAL)
    for start_n in range(0, key_end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k_nd = _load_rows(k_base, start_n, BLOCK_N, stride_ks, seqlen_k, HEAD_DIM)
        v_nd = _load_rows(v_base, start_n, BLOCK_N, stride_vs, seqlen_k, HEAD_DIM)
        s_mn = _dot(q_md, tl.trans(k_nd), DOT_FP32) * qk_scale_log2
        visible = _visible(rows[:, None], cols[None, :], seqlen_q, seqlen_k, CAUSAL)
        p_mn = tl.where(visible, tl.exp2(s_mn - lse_m[:, None]), 0.0)
        dp_mn = _dot(dout_md, tl.trans(v_nd), DOT_FP32)
        ds_mn = p_mn * (dp_mn - delta_m[:, None])
        dq_md += _dot(ds_mn.to(k_nd.dtype), k_nd, DOT_FP32)

    _store_rows(dq_ptr + batch * stride_dqb + head * stride_dqh, start_m, BLOCK_M, stride_dqs, seqlen_q,
                dq_md * sm_scale, HEAD_DIM)


def _check_backward_inputs(dout, q, out, lse) -> None:
    if dout.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"dout {tuple(dout.shape)} and out {tuple(out.shape)} must match q {tuple(q.shape)}")
    expected_lse = (q.shape[0], q.shape[2], q.shape[1])
    if tuple(lse.shape) != expected_lse:
        raise ValueError(f"lse must be [b, n_q, s_q] = {expected_lse}, got {tuple(lse.shape)}")


def attention_backward(dout, q, k, v, out, lse, causal, scale, *, block_m=None, block_n=None):
    """Implementation of triton_flash.triton_attention_backward (see there)."""
    check_attention_inputs(q, k, v, _attn_bwd_dq_kernel)
    _check_backward_inputs(dout, q, out, lse)
    q, k, v, out, dout = (dense_last_dim(t) for t in (q, k, v, out, dout))
    lse_bns = lse.to(torch.float32).contiguous()
    batch, seqlen_q, n_q, head_dim = q.shape
    seqlen_k, n_kv = k.shape[1], k.shape[2]
    if q.numel() == 0 or k.numel() == 0:  # no (query, key) pair: all gradients are zero
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    # Every in-range element is written by the kernels below.
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    interpreted = is_interpreted(_attn_bwd_dq_kernel)
    config = launch_config("bwd", head_dim, q.dtype, interpreted, block_m, block_n)
    tiles = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, HEAD_DIM=head_dim)
    launch = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    delta_bns = torch.empty_like(lse_bns)
    row_blocks = triton.cdiv(seqlen_q, config.block_m)
    _attn_bwd_delta_kernel[(row_blocks, batch * n_q)](
        out, dout, delta_bns, *bshd_strides(out), *bshd_strides(dout), n_q, seqlen_q,
        BLOCK_M=config.block_m, HEAD_DIM=head_dim, **launch)
    common = dict(CAUSAL=bool(causal), DOT_FP32=dot_in_fp32(q.dtype, interpreted), **tiles, **launch)
    scales = (float(scale) * LOG2E, float(scale))
    _attn_bwd_dkdv_kernel[(triton.cdiv(seqlen_k, config.block_n), batch * n_kv)](
        q, k, v, dout, lse_bns, delta_bns, dk, dv, *bshd_strides(q), *bshd_strides(k), *bshd_strides(v),
        *bshd_strides(dout), *bshd_strides(dk), *bshd_strides(dv), n_kv, n_q // n_kv, seqlen_q, seqlen_k,
        *scales, **common)
    _attn_bwd_dq_kernel[(row_blocks, batch * n_q)](
        q, k, v, dout, lse_bns, delta_bns, dq, *bshd_strides(q), *bshd_strides(k), *bshd_strides(v),
        *bshd_strides(dout), *bshd_strides(dq), n_q, n_q // n_kv, seqlen_q, seqlen_k, *scales, **common)
    return dq, dk, dv
