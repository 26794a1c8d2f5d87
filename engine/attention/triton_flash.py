"""FlashAttention-2 in Triton: the forward kernel returning the log-sum-exp, and the device helpers the
backward kernels (triton_flash_bwd.py) share; the public entry points are in triton_attention.py.

Layout: q [b, s_q, n_q, d], k/v [b, s_k, n_kv, d] (the flash-attn "bshd" layout), lse [b, n_q, s_q] fp32.

Conventions (callers such as ring attention rely on these):
- GQA/MQA: q head h reads kv head h // (n_q // n_kv); K/V are never expanded in memory.
- Causal mask is bottom-right aligned (flash-attn): query i sees key j iff j <= i + s_k - s_q.
- A query row that sees no key (causal with s_q > s_k, or s_k == 0) gets out = 0 and lse = -inf, the exact
  log of an empty sum, so `torch.logaddexp` merges such partial results without special cases. Flash-attn 2
  reports +inf and torch's CPU op 0 for such rows; the backward accepts any of these markers (such rows have
  no visible score, so their gradient is 0 whatever their lse).
- Scores, softmax statistics and all accumulators are fp32; fp32 inputs use IEEE fp32 dots (never TF32), so
  fp32 results agree with a float64 reference to ~1e-6 relative.

Online softmax and backward follow FlashAttention-2 (Dao, arXiv 2307.08691, Alg. 1 and 2), in base 2:
exp(x) = exp2(x * log2 e). The backward takes (out, lse) from the caller and never recomputes lse, so a
ring/LightSeq caller can pass the globally merged out and lse of all key chunks.

Runs on CUDA tensors, or on CPU tensors under Triton's interpreter: TRITON_INTERPRET=1 must be set before
triton is first imported in the process (`triton.jit`, also for triton.language's own helpers, picks the
interpreter when a function is defined).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

__all__ = ["triton_attention_forward"]   # the full API: engine/attention/triton_attention.py

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
LOG2E = math.log2(math.e)


# ---------------------------------------------------------------------------------------------------------
# Device helpers shared with the backward kernels (triton_flash_bwd.py)
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    """a @ b with an fp32 result. DOT_FP32: multiply in IEEE fp32 (fp32 inputs; bf16 under the
    interpreter, which multiplies raw bf16 bit patterns, triton-lang/triton#11584)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _visible(q_idx, k_idx, seqlen_q, seqlen_k, CAUSAL: tl.constexpr):
    """Which (query, key) pairs take part; q_idx/k_idx come pre-broadcast ([M, 1] x [1, N] or transposed)."""
    in_range = (q_idx < seqlen_q) & (k_idx < seqlen_k)
    if CAUSAL:
        in_range = in_range & (k_idx <= q_idx + (seqlen_k - seqlen_q))  # bottom-right aligned
    return in_range


@triton.jit
def _key_end(start_m, BLOCK_M: tl.constexpr, seqlen_q, seqlen_k, CAUSAL: tl.constexpr):
    """One past the last key any query of block [start_m, start_m + BLOCK_M) can see."""
    if CAUSAL:
        return tl.minimum(seqlen_k, start_m + BLOCK_M + (seqlen_k - seqlen_q))
    else:
        return seqlen_k


@triton.jit
def _load_rows(base, start, BLOCK: tl.constexpr, stride_s, seqlen, HEAD_DIM: tl.constexpr):
    """Rows [start, start + BLOCK) of one head's [s, d] slice; rows past seqlen read as 0."""
    local = tl.arange(0, BLOCK)
    # The block start goes into the scalar base in int64 (start * stride_s passes 2**31 at long context, e.g.
    # 256K tokens x 64 heads x d 128); offsets inside the tile stay int32 to keep register pressure low.
    block_base = base + tl.cast(start, tl.int64) * stride_s
    offsets = local[:, None] * stride_s + tl.arange(0, HEAD_DIM)[None, :]
    return tl.load(block_base + offsets, mask=(start + local)[:, None] < seqlen, other=0.0)


@triton.jit
def _store_rows(base, start, BLOCK: tl.constexpr, stride_s, seqlen, value, HEAD_DIM: tl.constexpr):
    local = tl.arange(0, BLOCK)
    block_base = base + tl.cast(start, tl.int64) * stride_s
    offsets = local[:, None] * stride_s + tl.arange(0, HEAD_DIM)[None, :]
    tl.store(block_base + offsets, value.to(base.dtype.element_ty), mask=(start + local)[:, None] < seqlen)


# ---------------------------------------------------------------------------------------------------------
# Forward kernel: one program per (query block, batch * q head)
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
    n_q_heads, group_size, seqlen_q, seqlen_k, qk_scale_log2,
    CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    batch = (tl.program_id(1) // n_q_heads).to(tl.int64)  # int64: batch * stride_b can pass 2**31
    head = (tl.program_id(1) % n_q_heads).to(tl.int64)
    kv_head = head // group_size
    q_base = q_ptr + batch * stride_qb + head * stride_qh
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh

    rows = start_m + tl.arange(0, BLOCK_M)
    q_md = _load_rows(q_base, start_m, BLOCK_M, stride_qs, seqlen_q, HEAD_DIM)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max, log2 units
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m_i)
    acc_md = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    key_end = _key_end(start_m, BLOCK_M, seqlen_q, seqlen_k, CAUSAL)
    for start_n in range(0, key_end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k_nd = _load_rows(k_base, start_n, BLOCK_N, stride_ks, seqlen_k, HEAD_DIM)
        v_nd = _load_rows(v_base, start_n, BLOCK_N, stride_vs, seqlen_k, HEAD_DIM)
        s_mn = _dot(q_md, tl.trans(k_nd), DOT_FP32) * qk_scale_log2
        s_mn = tl.where(_visible(rows[:, None], cols[None, :], seqlen_q, seqlen_k, CAUSAL), s_mn, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s_mn, 1))
        # Rows with no visible key yet keep m = -inf; shift by 0 so exp2 gives 0 instead of NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p_mn = tl.exp2(s_mn - m_shift[:, None])
        rescale = tl.exp2(m_i - m_shift)
        l_i = l_i * rescale + tl.sum(p_mn, 1)
        acc_md = acc_md * rescale[:, None] + _dot(p_mn.to(v_nd.dtype), v_nd, DOT_FP32)
        m_i = m_new

    empty = l_i == 0.0
    out_md = acc_md / tl.where(empty, 1.0, l_i)[:, None]
    lse_log2_m = m_i + tl.log2(tl.where(empty, 1.0, l_i))
    lse_m = tl.where(empty, float("-inf"), lse_log2_m * 0.6931471805599453)  # back to natural log: * ln 2
    _store_rows(out_ptr + batch * stride_ob + head * stride_oh, start_m, BLOCK_M, stride_os, seqlen_q, out_md, HEAD_DIM)
    tl.store(lse_ptr + (batch * n_q_heads + head) * seqlen_q + rows, lse_m, mask=rows < seqlen_q)


# ---------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def is_interpreted(kernel) -> bool:
    """True when `kernel` was defined under TRITON_INTERPRET=1 (runs on CPU tensors, no GPU)."""
    return not isinstance(kernel, JITFunction)


def launch_config(kernel_kind: str, head_dim: int, dtype: torch.dtype, interpreted: bool,
                  block_m: int | None = None, block_n: int | None = None) -> LaunchConfig:
    """Tiles for kernel_kind "fwd" or "bwd". GPU values compile for sm_90 without register spills (16-bit; fp32
    spills <= 24 B) but are not yet timed on a GPU; the interpreter uses 16x16 tiles so small test
    shapes span several blocks."""
    if interpreted:
        config = LaunchConfig(16, 16, 1, 1)
    elif dtype == torch.float32:  # IEEE fp32 dots run on FMA units; larger tiles spill registers
        config = LaunchConfig(32, 32, 8, 2)
    else:
        key_block = 64 if head_dim <= 64 else 32
        config = LaunchConfig(128 if kernel_kind == "fwd" else 64, key_block, 8, 3)
    config = LaunchConfig(block_m or config.block_m, block_n or config.block_n, config.num_warps, config.num_stages)
    for block in (config.block_m, config.block_n):
        if block < 16 or block & (block - 1):
            raise ValueError(f"block sizes must be powers of two >= 16 (tl.dot minimum), got {block}")
    return config


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [b, s_q, n_q, d] and k, v [b, s_k, n_kv, d], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"batch or head dim of q {tuple(q.shape)} and k {tuple(k.shape)} differ")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"n_q={q.shape[2]} must be a multiple of n_kv={k.shape[2]}")
    if q.shape[3] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {q.shape[3]} unsupported; use one of {SUPPORTED_HEAD_DIMS}")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of {SUPPORTED_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    if q.device.type != "cuda" and not is_interpreted(kernel):
        raise ValueError("Triton kernels need CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 before "
                         "engine.attention.triton_flash is imported")


def dense_last_dim(t: torch.Tensor) -> torch.Tensor:
    """Kernels index the head dim with stride 1; other strides are passed through."""
    return t if t.stride(-1) == 1 else t.contiguous()


def dot_in_fp32(dtype: torch.dtype, interpreted: bool) -> bool:
    return dtype == torch.float32 or (interpreted and dtype == torch.bfloat16)


def bshd_strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def triton_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                             *, block_m: int | None = None, block_n: int | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale * q k^T [+ causal mask]) v and its natural-log LSE.

    q [b, s_q, n_q, d], k/v [b, s_k, n_kv, d] -> out [b, s_q, n_q, d] (q's dtype), lse [b, n_q, s_q] fp32.
    Rows that see no key: out 0, lse -inf (module docstring). block_m/block_n override the tile sizes.
    """
    check_attention_inputs(q, k, v, _attn_fwd_kernel)
    q, k, v = dense_last_dim(q), dense_last_dim(k), dense_last_dim(v)
    batch, seqlen_q, n_q, head_dim = q.shape
    seqlen_k, n_kv = k.shape[1], k.shape[2]
    out_bsnd = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse_bns = torch.empty((batch, n_q, seqlen_q), dtype=torch.float32, device=q.device)
    if out_bsnd.numel() == 0:
        return out_bsnd, lse_bns
    interpreted = is_interpreted(_attn_fwd_kernel)
    config = launch_config("fwd", head_dim, q.dtype, interpreted, block_m, block_n)
    grid = (triton.cdiv(seqlen_q, config.block_m), batch * n_q)
    _attn_fwd_kernel[grid](
        q, k, v, out_bsnd, lse_bns,
        *bshd_strides(q), *bshd_strides(k), *bshd_strides(v), *bshd_strides(out_bsnd),
        n_q, n_q // n_kv, seqlen_q, seqlen_k, float(scale) * LOG2E,
        CAUSAL=bool(causal), DOT_FP32=dot_in_fp32(q.dtype, interpreted),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, HEAD_DIM=head_dim,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out_bsnd, lse_bns
