"""Block backends: cpu vs math vs torch SDPA, forward and backward, and the shared conventions."""
import math

import pytest
import torch
import torch.nn.functional as F

from engine.attention import (BackendUnavailableError, available_backends, block_backward, block_forward,
                              resolve_backend)
from engine.attention import math_backend
from engine.attention.math_backend import causal_mask

# fp32 kernels with different reduction orders: ~1e-7 relative expected
TOL = dict(rtol=1e-5, atol=1e-6)
SHAPES = [(6, 6), (4, 7), (7, 4)]  # (s_q, s_k)


def _inputs(s_q, s_k, kv_heads, seed=0, heads=4, head_dim=8):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, s_q, heads, head_dim, generator=gen)
    k, v = (torch.randn(2, s_k, kv_heads, head_dim, generator=gen) for _ in range(2))
    dout = torch.randn(2, s_q, heads, head_dim, generator=gen)
    return q, k, v, dout


def _sdpa_reference(q, k, v, dout, causal, scale):
    """torch SDPA in float64 with an explicit bottom-right mask (independent of foldmoe)."""
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    mask = ~causal_mask(q.shape[1], k.shape[1], q.device) if causal else None
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale, enable_gqa=True).transpose(1, 2)
    live = slice(max(q.shape[1] - k.shape[1], 0) if causal else 0, None)  # fully masked rows are nan
    out_live = out[:, live]
    grads = torch.autograd.grad(out_live, (q, k, v), dout.double()[:, live])
    return out_live.detach(), grads, live


@pytest.mark.parametrize("backend", ["cpu", "math"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("s_q,s_k", SHAPES)
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_backend_matches_sdpa(backend, causal, s_q, s_k, kv_heads):
    q, k, v, dout = _inputs(s_q, s_k, kv_heads)
    scale = 0.3
    out, lse = block_forward(q, k, v, causal=causal, scale=scale, backend=backend)
    grads = block_backward(dout, q, k, v, out, lse, causal=causal, scale=scale, backend=backend)
    ref_out, ref_grads, live = _sdpa_reference(q, k, v, dout, causal, scale)
    torch.testing.assert_close(out[:, live].double(), ref_out, **TOL)
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape
        torch.testing.assert_close(got.double(), want, **TOL)
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, s_q)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("s_q,s_k", SHAPES)
def test_cpu_and_math_agree_on_lse(causal, s_q, s_k):
    q, k, v, _ = _inputs(s_q, s_k, 2, seed=1)
    _, lse_cpu = block_forward(q, k, v, causal=causal, scale=0.25, backend="cpu")
    _, lse_math = block_forward(q, k, v, causal=causal, scale=0.25, backend="math")
    torch.testing.assert_close(lse_cpu, lse_math, **TOL)


@pytest.mark.parametrize("backend", ["cpu", "math"])
def test_fully_masked_rows_are_zero_with_minus_inf_lse(backend):
    q, k, v, dout = _inputs(7, 4, 2)  # bottom-right causal: rows 0..2 see no key
    out, lse = block_forward(q, k, v, causal=True, scale=0.3, backend=backend)
    assert torch.isneginf(lse[..., :3]).all() and torch.isfinite(lse[..., 3:]).all()
    assert (out[:, :3] == 0).all()
    dq, _, _ = block_backward(dout, q, k, v, out, lse, causal=True, scale=0.3, backend=backend)
    assert (dq[:, :3] == 0).all() and torch.isfinite(dq).all()


@pytest.mark.parametrize("backend", ["cpu", "math"])
def test_backward_with_global_lse_splits_over_key_blocks(backend):
    """Ring backward relies on it: block grads from the global (out, lse) sum to the full grads."""
    q, k, v, dout = _inputs(6, 8, 2, seed=2)
    out, lse = block_forward(q, k, v, causal=False, scale=0.3, backend=backend)
    full = block_backward(dout, q, k, v, out, lse, causal=False, scale=0.3, backend=backend)
    parts = [block_backward(dout, q, k[:, s], v[:, s], out, lse, causal=False, scale=0.3, backend=backend)
             for s in (slice(0, 3), slice(3, 8))]
    torch.testing.assert_close(parts[0][0] + parts[1][0], full[0], **TOL)
    torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]], 1), full[1], **TOL)
    torch.testing.assert_close(torch.cat([parts[0][2], parts[1][2]], 1), full[2], **TOL)


def test_bf16_cpu_close_to_fp32():
    q, k, v, dout = _inputs(8, 8, 2, seed=3)
    out32, _ = block_forward(q, k, v, causal=True, scale=1 / math.sqrt(8), backend="cpu")
    out16, lse16 = block_forward(*(t.bfloat16() for t in (q, k, v)), causal=True, scale=1 / math.sqrt(8),
                                 backend="cpu")
    assert out16.dtype == torch.bfloat16 and lse16.dtype == torch.float32
    # bf16 inputs and output: a few bf16 roundings of ~2^-9 relative each
    torch.testing.assert_close(out16.float(), out32, rtol=2e-2, atol=2e-2)


def test_positive_inf_lse_is_normalised(monkeypatch):
    """flash-attn marks empty rows with lse=+inf; the interface returns -inf so merging ignores them."""
    real_forward = math_backend.forward

    def forward_with_inf(q, k, v, causal, scale):
        out, lse = real_forward(q, k, v, causal, scale)
        return out, lse.index_fill(2, torch.tensor([0]), float("inf"))

    monkeypatch.setattr(math_backend, "forward", forward_with_inf)
    q, k, v, _ = _inputs(4, 4, 2)
    _, lse = block_forward(q, k, v, causal=False, scale=0.3, backend="math")
    assert torch.isneginf(lse[..., 0]).all() and torch.isfinite(lse[..., 1:]).all()


def test_backend_resolution_and_errors():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, torch.float32).NAME == "cpu"
    assert resolve_backend("math", cpu, torch.bfloat16).NAME == "math"
    with pytest.raises(ValueError, match="expected one of"):
        resolve_backend("xformers", cpu, torch.float32)
    for name in ("flash_attn", "triton"):
        with pytest.raises(BackendUnavailableError, match=name):
            resolve_backend(name, cpu, torch.float16)


def test_auto_skips_a_kernel_without_the_head_dim(monkeypatch):
    # As on a GPU with flash-attn and Triton installed: fp32 rules out flash-attn, and Triton
    # has kernels for 16/32/64/128 only, so head dim 80 (or 96) takes math, not an error.
    from engine.attention import backends
    monkeypatch.setattr(backends, "_installed", lambda name: True)
    cuda = torch.device("cuda")
    assert backends.resolve_backend("auto", cuda, torch.float32, 64).NAME == "triton"
    with pytest.warns(RuntimeWarning, match=r"auto chose math on CUDA .*triton: no kernel for head dim 80"):
        assert backends.resolve_backend("auto", cuda, torch.float32, 80).NAME == "math"
    assert backends.resolve_backend("auto", cuda, torch.bfloat16, 80).NAME == "flash_attn"
    with pytest.warns(RuntimeWarning, match="flash_attn: no kernel for head dim 320"):
        assert backends.resolve_backend("auto", cuda, torch.bfloat16, 320).NAME == "math"
    with pytest.raises(BackendUnavailableError, match="triton.*no kernel for head dim 96"):
        backends.resolve_backend("triton", cuda, torch.float32, 96)


def test_shape_errors_are_clear():
    q, k, v, _ = _inputs(4, 4, 3, heads=4)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        block_forward(q, k, v, causal=True, scale=0.3)


def test_available_backends_on_cpu():
    names = available_backends("cpu", torch.float32)
    assert "cpu" in names and "math" in names and "flash_attn" not in names
