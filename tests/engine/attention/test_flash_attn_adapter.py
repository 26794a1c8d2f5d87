"""flash-attn adapter logic on CPU with stand-ins for the 2.x internals (old and >= 2.7 signatures).

The stand-ins compute with the math backend, so the adapter's plumbing (keyword choice by signature,
result layout, head-dim padding, in-place backward) is checked end to end without CUDA.
"""
import inspect
from types import SimpleNamespace

import pytest
import torch

from engine.attention import flash_attn_backend, math_backend
from engine.attention.block import expand_kv_heads, reduce_kv_heads

TOL = dict(rtol=1e-5, atol=1e-6)  # same math on zero-padded head dims: fp32 rounding only
CALLS = []


def _fwd_math(q, k, v, softmax_scale, causal):
    assert q.shape[-1] % 8 == 0, "adapter must pad the head dim"
    k, v = (expand_kv_heads(t, q.shape[2]) for t in (k, v))  # flash-attn takes GQA natively
    return math_backend.forward(q, k, v, causal, softmax_scale)


def _bwd_math(dout, q, k, v, out, lse, dq, dk, dv, softmax_scale, causal):
    kv_heads = k.shape[2]
    k, v = (expand_kv_heads(t, q.shape[2]) for t in (k, v))
    gq, gk, gv = math_backend.backward(dout, q, k, v, out, lse, causal, softmax_scale)
    dq.copy_(gq), dk.copy_(reduce_kv_heads(gk, kv_heads)), dv.copy_(reduce_kv_heads(gv, kv_heads))


def new_forward(q, k, v, dropout_p: float, softmax_scale: float, causal: bool, window_size_left: int,
                window_size_right: int, softcap: float, alibi_slopes, return_softmax: bool):
    CALLS.append(("fwd", window_size_left, window_size_right, softcap, return_softmax))
    out, lse = _fwd_math(q, k, v, softmax_scale, causal)
    return out, lse, torch.empty(0), torch.empty(2)


def new_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p: float, softmax_scale: float,
                 causal: bool, window_size_left: int, window_size_right: int, softcap: float, alibi_slopes,
                 deterministic: bool, rng_state=None):
    CALLS.append(("bwd", window_size_left, window_size_right, deterministic))
    _bwd_math(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal)


def old_forward(q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes, return_softmax):
    CALLS.append(("fwd", window_size))
    out, lse = _fwd_math(q, k, v, softmax_scale, causal)
    return out, q, k, v, out, lse, None, None  # 2.x before 2.7: 8 results, lse at index 5


def old_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal, window_size,
                 alibi_slopes, deterministic, rng_state=None):
    CALLS.append(("bwd", window_size))
    _bwd_math(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal)


class CustomOpLike:
    """What torch.library.custom_op returns: (*args, **kwargs) outside, the real function in _init_fn."""

    def __init__(self, fn):
        self._init_fn = fn

    def __call__(self, *args, **kwargs):
        return self._init_fn(*args, **kwargs)


@pytest.mark.parametrize("flavour", ["new", "old"])
@pytest.mark.parametrize("causal", [True, False])
def test_adapter_matches_math(monkeypatch, flavour, causal):
    if flavour == "new":
        fwd, bwd = CustomOpLike(new_forward), CustomOpLike(new_backward)
    else:
        fwd, bwd = old_forward, old_backward
    monkeypatch.setattr(flash_attn_backend, "_interface",
                        lambda: SimpleNamespace(_flash_attn_forward=fwd, _flash_attn_backward=bwd))
    CALLS.clear()
    gen = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(2, 5, 4, 12, generator=gen) for _ in range(2))  # head dim 12 -> padded to 16
    k, v = (torch.randn(2, 7, 2, 12, generator=gen) for _ in range(2))
    out, lse = flash_attn_backend.forward(q, k, v, causal, 0.3)
    grads = flash_attn_backend.backward(dout, q, k, v, out, lse, causal, 0.3)
    k_full, v_full = (expand_kv_heads(t, 4) for t in (k, v))
    ref_out, ref_lse = math_backend.forward(q, k_full, v_full, causal, 0.3)
    ref_dq, ref_dk, ref_dv = math_backend.backward(dout, q, k_full, v_full, ref_out, ref_lse, causal, 0.3)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(lse, ref_lse, **TOL)
    for got, want in zip(grads, (ref_dq, reduce_kv_heads(ref_dk, 2), reduce_kv_heads(ref_dv, 2))):
        torch.testing.assert_close(got, want, **TOL)
    expected = ([("fwd", -1, -1, 0.0, False), ("bwd", -1, -1, False)] if flavour == "new"
                else [("fwd", (-1, -1)), ("bwd", (-1, -1))])
    assert CALLS == expected


def test_keywords_follow_the_signature():
    sig = inspect.signature(lambda q, k, v, dropout_p, softmax_scale, causal, return_softmax: None)  # 2.0-2.2
    assert flash_attn_backend.forward_kwargs(sig, True, 0.5) == {
        "dropout_p": 0.0, "softmax_scale": 0.5, "causal": True, "return_softmax": False}
    assert "window_size" in flash_attn_backend.forward_kwargs(inspect.signature(old_forward), True, 0.5)
    new_kwargs = flash_attn_backend.backward_kwargs(flash_attn_backend.signature_of(CustomOpLike(new_backward)),
                                                    False, 0.5)
    assert new_kwargs["window_size_left"] == -1 and new_kwargs["deterministic"] is False


def test_unknown_required_parameter_is_reported():
    sig = inspect.signature(lambda q, k, v, dropout_p, softmax_scale, causal, sink_tokens: None)
    with pytest.raises(RuntimeError, match="sink_tokens"):
        flash_attn_backend.forward_kwargs(sig, True, 0.5)
