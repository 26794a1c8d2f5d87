"""Triton FlashAttention-2 forward/backward vs a float64 math reference.

Without CUDA the kernels run on CPU tensors under Triton's interpreter. TRITON_INTERPRET=1 must be set before
triton.language is imported (its own @jit helpers, used by tl.sum/tl.max, are defined then), so this module sets
it (setdefault) before anything imports triton. The variable stays set for the rest of the pytest process; on a
CPU-only machine that only makes later-defined Triton kernels runnable at all. If an earlier-collected module
already imported triton without it, the tests here are skipped and `test_rerun_in_fresh_process` runs this file
in a subprocess with the variable set. With CUDA the compiled kernels run on the GPU instead.

Tolerances:
- fp32: rtol=1e-5, atol=5e-6. Scores, softmax statistics and accumulators are fp32 (IEEE dots), so only fp32
  rounding/reduction order differs from float64: measured max abs error <= 1.1e-6 (values up to ~4).
- bf16: max|err| <= 2e-2 * max|ref| for out/dq/dk/dv. Inputs are identical (bf16-rounded) in the reference;
  the kernel rounds out/grads to bf16 (2**-9 relative) and, like FlashAttention-2, feeds P and dS to the dots
  in bf16: measured <= 7.1e-3 here (<= 1.1e-2 over a wider sweep), on par with eager bf16 math autograd
  on the same inputs (<= 1.3e-2).
  lse stays fp32 from exact bf16 products: atol 1e-4 (measured 5e-7).
- fp16 (one case; under the interpreter it is the path whose dots take 16-bit operands as on a GPU): same
  reasoning with 2**-11 rounding: max|err| <= 2e-3 * max|ref| (measured <= 4.4e-4).
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch

ON_GPU = torch.cuda.is_available()
# triton imported earlier in this process without the interpreter: its kernels cannot run on CPU here.
STALE_TRITON = not ON_GPU and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (see docstring)

import pytest  # noqa: E402

import engine.attention.triton_attention as tf  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
FP32_TOL = dict(rtol=1e-5, atol=5e-6)
LOW_PRECISION_REL_TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3}
LOW_PRECISION_LSE_ATOL = 1e-4
REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(autouse=True)
def _skip_if_triton_is_stale(request):
    if STALE_TRITON and request.node.originalname != "test_rerun_in_fresh_process":
        pytest.skip(reason="triton was imported without TRITON_INTERPRET before this module; "
                           "test_rerun_in_fresh_process runs this file in a subprocess")


@pytest.mark.skipif(not STALE_TRITON, reason="only needed when triton was imported without the interpreter")
def test_rerun_in_fresh_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:]


# (batch, s_q, s_k, n_q, n_kv, head_dim); tiles are 16x16 under the interpreter.
CASES = {
    "mha_s40_partial_block": (1, 40, 40, 4, 4, 64),  # 40 = 2.5 tiles
    "gqa_sq16_sk24": (2, 16, 24, 4, 2, 32),
    "mqa_sq24_sk16": (1, 24, 16, 4, 1, 16),  # causal: query rows 0..7 see no key
}
LOW_PRECISION_CASES = [("mha_s40_partial_block", torch.bfloat16), ("mqa_sq24_sk16", torch.bfloat16),
                       ("gqa_sq16_sk24", torch.float16)]
LOW_PRECISION_IDS = [f"{case}-{str(dtype).removeprefix('torch.')}" for case, dtype in LOW_PRECISION_CASES]


def _inputs(case, dtype=torch.float32, seed=0):
    batch, s_q, s_k, n_q, n_kv, head_dim = CASES[case] if isinstance(case, str) else case
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

    q, k, v = rand(batch, s_q, n_q, head_dim), rand(batch, s_k, n_kv, head_dim), rand(batch, s_k, n_kv, head_dim)
    return q, k, v, rand(batch, s_q, n_q, head_dim), head_dim ** -0.5


def _reference(q, k, v, causal, scale):
    """Math attention in the caller's dtype (float64 here); empty rows give out 0, lse -inf, finite grads."""
    s_q, n_q, s_k, n_kv = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    q_bnsd = q.transpose(1, 2)
    k_bnsd = k.transpose(1, 2).repeat_interleave(n_q // n_kv, dim=1)  # expanded only in the reference
    v_bnsd = v.transpose(1, 2).repeat_interleave(n_q // n_kv, dim=1)
    scores = q_bnsd @ k_bnsd.transpose(-1, -2) * scale
    if causal:  # bottom-right aligned
        rows = torch.arange(s_q, device=q.device)[:, None]
        cols = torch.arange(s_k, device=q.device)[None, :]
        scores = scores.masked_fill(cols > rows + s_k - s_q, float("-inf"))
    row_max = scores.amax(-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    total = weights.sum(-1, keepdim=True)
    out_bnsd = weights / torch.where(total > 0, total, torch.ones_like(total)) @ v_bnsd
    return out_bnsd.transpose(1, 2), (row_max + torch.log(total)).squeeze(-1)


def _reference_with_grads(q, k, v, dout, causal, scale):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out, lse = _reference(*leaves, causal, scale)
    out.backward(dout.double())
    return out.detach(), lse.detach(), [t.grad for t in leaves]


def _assert_close_scaled(actual, expected, rel, name):
    err = (actual.double() - expected).abs().max().item()
    bound = rel * expected.abs().max().item()
    assert err <= bound, f"{name}: max abs error {err:.3e} > {bound:.3e}"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_float64_reference_fp32(case, causal):
    q, k, v, _, scale = _inputs(case)
    out, lse = tf.triton_attention_forward(q, k, v, causal, scale)
    ref_out, ref_lse = _reference(q.double(), k.double(), v.double(), causal, scale)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    torch.testing.assert_close(out.double(), ref_out, **FP32_TOL)
    torch.testing.assert_close(lse.double(), ref_lse, **FP32_TOL)  # also requires -inf exactly where empty
    if causal and case == "mqa_sq24_sk16":
        assert torch.isneginf(lse[:, :, :8]).all() and (out[:, :8] == 0).all()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", list(CASES))
def test_backward_matches_float64_autograd_fp32(case, causal):
    q, k, v, dout, scale = _inputs(case)
    ref_out, ref_lse, ref_grads = _reference_with_grads(q, k, v, dout, causal, scale)
    grads = tf.triton_attention_backward(dout, q, k, v, ref_out.float(), ref_lse.float(), causal, scale)
    for name, grad, ref_grad, like in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
        assert grad.shape == like.shape and grad.dtype == like.dtype, name
        torch.testing.assert_close(grad.double(), ref_grad, **FP32_TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("case,dtype", LOW_PRECISION_CASES, ids=LOW_PRECISION_IDS)
def test_forward_16bit_within_stated_tolerance(case, dtype):
    q, k, v, _, scale = _inputs(case, dtype)
    out, lse = tf.triton_attention_forward(q, k, v, True, scale)
    ref_out, ref_lse = _reference(q.double(), k.double(), v.double(), True, scale)
    assert out.dtype == dtype and lse.dtype == torch.float32
    _assert_close_scaled(out, ref_out, LOW_PRECISION_REL_TOL[dtype], "out")
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=LOW_PRECISION_LSE_ATOL)


@pytest.mark.parametrize("case,dtype", LOW_PRECISION_CASES, ids=LOW_PRECISION_IDS)
def test_backward_16bit_within_stated_tolerance(case, dtype):
    q, k, v, dout, scale = _inputs(case, dtype)
    ref_out, ref_lse, ref_grads = _reference_with_grads(q, k, v, dout, True, scale)
    grads = tf.triton_attention_backward(dout, q, k, v, ref_out.to(dtype), ref_lse.float(), True, scale)
    for name, grad, ref_grad in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert grad.dtype == dtype, name
        _assert_close_scaled(grad, ref_grad, LOW_PRECISION_REL_TOL[dtype], name)


def _merge(out_a, lse_a, out_b, lse_b):
    """Exact merge of two key chunks' partial results; lse [b, n, s] -> weights [b, s, n, 1]."""
    lse = torch.logaddexp(lse_a, lse_b)
    weight_a = torch.exp(lse_a - lse).transpose(1, 2).unsqueeze(-1)
    weight_b = torch.exp(lse_b - lse).transpose(1, 2).unsqueeze(-1)
    return out_a * weight_a + out_b * weight_b, lse


def test_backward_with_external_merged_lse_matches_unsplit():
    """Ring/LightSeq use: each key chunk's backward gets the merged (global) out and lse, not its own."""
    q, _, _, dout, scale = _inputs((1, 16, 16, 4, 2, 32), seed=1)  # queries = second half of 32 tokens
    _, k, v, _, _ = _inputs((1, 16, 32, 4, 2, 32), seed=2)
    out_whole, lse_whole = tf.triton_attention_forward(q, k, v, True, scale)
    grads_whole = tf.triton_attention_backward(dout, q, k, v, out_whole, lse_whole, True, scale)

    chunks = [(k[:, :16], v[:, :16], False), (k[:, 16:], v[:, 16:], True)]  # past keys, then the diagonal
    partial = [tf.triton_attention_forward(q, k_c, v_c, causal, scale) for k_c, v_c, causal in chunks]
    out, lse = _merge(*partial[0], *partial[1])
    torch.testing.assert_close(out, out_whole, **FP32_TOL)
    torch.testing.assert_close(lse, lse_whole, **FP32_TOL)
    chunk_grads = [tf.triton_attention_backward(dout, q, k_c, v_c, out, lse, causal, scale)
                   for k_c, v_c, causal in chunks]
    torch.testing.assert_close(chunk_grads[0][0] + chunk_grads[1][0], grads_whole[0], **FP32_TOL)
    for index in (1, 2):  # dk, dv: each chunk owns its keys
        torch.testing.assert_close(torch.cat([g[index] for g in chunk_grads], dim=1), grads_whole[index],
                                   **FP32_TOL)


def test_strided_views_match_contiguous_inputs():
    """Callers pass views such as q_bnsd.transpose(1, 2); the kernels take b/s/h strides, not contiguity."""
    q, k, v, dout, scale = _inputs("gqa_sq16_sk24", seed=4)
    views = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]  # same values, bnsd memory
    assert not views[0].is_contiguous()
    out, lse = tf.triton_attention_forward(q, k, v, True, scale)
    out_view, lse_view = tf.triton_attention_forward(*views, True, scale)
    assert torch.equal(out, out_view) and torch.equal(lse, lse_view)
    grads = tf.triton_attention_backward(dout, q, k, v, out, lse, True, scale)
    grads_view = tf.triton_attention_backward(dout, *views, out_view, lse_view, True, scale)  # q strides != dout's
    for grad, grad_view in zip(grads, grads_view):
        assert torch.equal(grad, grad_view)


@pytest.mark.parametrize("marker", [float("inf"), 0.0], ids=["flash_attn_plus_inf", "torch_cpu_zero"])
def test_backward_accepts_other_empty_row_lse_markers(marker):
    """Other backends mark rows that see no key with lse +inf or 0; the gradients must not depend on it."""
    q, k, v, dout, scale = _inputs((1, 24, 16, 2, 1, 16))
    out, lse = tf.triton_attention_forward(q, k, v, True, scale)
    assert torch.isneginf(lse[:, :, :8]).all() and torch.isfinite(lse[:, :, 8:]).all()
    grads = tf.triton_attention_backward(dout, q, k, v, out, lse, True, scale)
    grads_marked = tf.triton_attention_backward(dout, q, k, v, out, lse.nan_to_num(neginf=marker), True, scale)
    for grad, grad_marked in zip(grads, grads_marked):
        assert torch.equal(grad, grad_marked)
    assert (grads[0][:, :8] == 0).all()


def test_autograd_wrapper_matches_reference():
    q, k, v, dout, scale = _inputs("gqa_sq16_sk24", seed=3)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = tf.TritonFlashAttention.apply(*leaves, True, scale)
    out.backward(dout)
    ref_out, _, ref_grads = _reference_with_grads(q, k, v, dout, True, scale)
    torch.testing.assert_close(out.detach().double(), ref_out, **FP32_TOL)
    for leaf, ref_grad in zip(leaves, ref_grads):
        torch.testing.assert_close(leaf.grad.double(), ref_grad, **FP32_TOL)


@pytest.mark.parametrize("head_dim", [8, 24, 256])
def test_unsupported_head_dim_raises(head_dim):
    q, k, v = (torch.zeros(1, 4, 2, head_dim, device=DEVICE) for _ in range(3))
    with pytest.raises(ValueError, match="head dim"):
        tf.triton_attention_forward(q, k, v, False, 1.0)
    with pytest.raises(ValueError, match="head dim"):
        tf.triton_attention_backward(q, q, k, v, q, torch.zeros(1, 2, 4, device=DEVICE), False, 1.0)


def test_heads_not_divisible_by_kv_heads_raises():
    q, kv = torch.zeros(1, 4, 3, 16, device=DEVICE), torch.zeros(1, 4, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="multiple"):
        tf.triton_attention_forward(q, kv, kv, False, 1.0)


_SM90_COMPILE = r"""
import torch, triton
from triton.backends.compiler import GPUTarget
from engine.attention import triton_flash as tf, triton_flash_bwd as tb
assert not tf.is_interpreted(tf._attn_fwd_kernel)


def arg_type(name, dtype, consts):
    if name in consts:
        return "constexpr"
    if name in ("lse_ptr", "delta_ptr"):
        return "*fp32"
    if name.endswith("_ptr"):
        return f"*{dtype}"
    return "fp32" if name in ("qk_scale_log2", "sm_scale") else "i32"


ALL_KERNELS = (("fwd", tf._attn_fwd_kernel), ("bwd", tb._attn_bwd_delta_kernel), ("bwd", tb._attn_bwd_dkdv_kernel),
               ("bwd", tb._attn_bwd_dq_kernel))
# bf16: the production path (tensor-core dots); fp32: one kernel covers the shared IEEE-dot helper.
for dtype, torch_dtype, kernels in (("bf16", torch.bfloat16, ALL_KERNELS), ("fp32", torch.float32, ALL_KERNELS[:1])):
    for kind, kernel in kernels:
        cfg = tf.launch_config(kind, 64, torch_dtype, interpreted=False)
        consts = dict(CAUSAL=True, DOT_FP32=dtype == "fp32", BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_DIM=64)
        consts = {name: value for name, value in consts.items() if name in kernel.arg_names}
        signature = {name: arg_type(name, dtype, consts) for name in kernel.arg_names}
        compiled = triton.compile(triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=consts),
                                  target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        assert compiled.metadata.shared <= 232448, (kernel.fn.__name__, compiled.metadata.shared)  # 227 KiB
        print(dtype, kernel.fn.__name__, "shared", compiled.metadata.shared)
"""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None,
                    reason="needs Triton's NVIDIA backend (ptxas) to compile for sm_90")
def test_kernels_compile_for_sm90_without_gpu(tmp_path):
    """The interpreter accepts code the GPU compiler rejects; compile the GPU paths (bf16 dots, fp32 IEEE)
    ahead of time for Hopper in a subprocess without TRITON_INTERPRET."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run([sys.executable, "-c", _SM90_COMPILE], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("shared") == 5, result.stdout


def test_the_backend_table_lists_the_kernels_head_dims():
    from engine.attention import triton_backend
    from engine.attention.triton_flash import SUPPORTED_HEAD_DIMS
    assert triton_backend.HEAD_DIMS == SUPPORTED_HEAD_DIMS
