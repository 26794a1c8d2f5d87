"""flash-attn 2.x backend through `flash_attn.flash_attn_interface._flash_attn_forward/_backward`.

The internals changed across 2.x: older releases take `window_size=(l, r)`, 2.7+ take
`window_size_left/right` plus `softcap`, `alibi_slopes`, `return_softmax`, and wrap the function
in a torch custom op. The keyword set is therefore chosen from the signature, never from the
version string. flash-attn aligns causal bottom-right, accepts fewer kv heads (GQA), and returns
lse = +inf for fully masked rows (the block layer maps that to -inf).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

NAME = "flash_attn"
NATIVE_GQA = True
HALF_DTYPES = (torch.float16, torch.bfloat16)
HEAD_DIMS = range(1, 257)    # flash-attn 2 kernels go to 256; forward() pads to a multiple of 8
_TENSOR_PARAMS_FWD = ("q", "k", "v")
_TENSOR_PARAMS_BWD = ("dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv")


def _interface():
    from flash_attn import flash_attn_interface  # lazy: optional dependency, CUDA only
    return flash_attn_interface


def is_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        _interface()
    except Exception:  # noqa: BLE001 - ImportError, or OSError from a wheel built for another torch
        return False
    return True


def signature_of(fn) -> inspect.Signature:
    """Signature of fn; torch.library.custom_op hides it behind `_init_fn`."""
    return inspect.signature(getattr(fn, "_init_fn", fn))


def _common_kwargs(names, causal: bool, scale: float) -> dict:
    kwargs = {"dropout_p": 0.0, "softmax_scale": scale, "causal": causal}
    if "window_size_left" in names:
        kwargs.update(window_size_left=-1, window_size_right=-1)
    elif "window_size" in names:
        kwargs["window_size"] = (-1, -1)
    for name, value in (("softcap", 0.0), ("alibi_slopes", None)):
        if name in names:
            kwargs[name] = value
    return kwargs


def forward_kwargs(signature: inspect.Signature, causal: bool, scale: float) -> dict:
    names = signature.parameters
    kwargs = _common_kwargs(names, causal, scale)
    if "return_softmax" in names:
        kwargs["return_softmax"] = False
    _check_covered(signature, len(_TENSOR_PARAMS_FWD), kwargs)
    return kwargs


def backward_kwargs(signature: inspect.Signature, causal: bool, scale: float) -> dict:
    names = signature.parameters
    kwargs = _common_kwargs(names, causal, scale)
    for name, value in (("deterministic", False), ("rng_state", None)):
        if name in names:
            kwargs[name] = value
    _check_covered(signature, len(_TENSOR_PARAMS_BWD), kwargs)
    return kwargs


def _check_covered(signature: inspect.Signature, num_positional: int, kwargs: dict) -> None:
    params = list(signature.parameters.values())[num_positional:]
    missing = [p.name for p in params if p.name not in kwargs and p.default is inspect.Parameter.empty]
    if missing:
        raise RuntimeError(f"unsupported flash-attn internal signature {signature}: no value for {missing}")


def lse_from_forward_result(result: tuple, s_q: int) -> torch.Tensor:
    # 2.7+: (out, lse, S_dmask, rng_state); older: (out, q, k, v, out_padded, lse, S_dmask, rng_state).
    lse = result[1] if len(result) == 4 else result[5]
    return lse[..., :s_q]


def _pad_head_dim(*tensors):
    # The kernels need head dim % 8 == 0; padding with zeros changes neither scores nor outputs.
    extra = -tensors[0].shape[-1] % 8
    return tensors if extra == 0 else tuple(F.pad(t, (0, extra)) for t in tensors)


def forward(q_bsnd, k_bsnd, v_bsnd, causal: bool, scale: float):
    fn = _interface()._flash_attn_forward
    head_dim = q_bsnd.shape[-1]
    q, k, v = _pad_head_dim(q_bsnd, k_bsnd, v_bsnd)
    result = fn(q, k, v, **forward_kwargs(signature_of(fn), causal, scale))
    return result[0][..., :head_dim], lse_from_forward_result(result, q.shape[1])


def backward(dout_bsnd, q_bsnd, k_bsnd, v_bsnd, out_bsnd, lse_bns, causal: bool, scale: float):
    fn = _interface()._flash_attn_backward
    head_dim = q_bsnd.shape[-1]
    dout, q, k, v, out = (t.contiguous() for t in _pad_head_dim(dout_bsnd, q_bsnd, k_bsnd, v_bsnd, out_bsnd))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    fn(dout, q, k, v, out, lse_bns.float().contiguous(), dq, dk, dv,
       **backward_kwargs(signature_of(fn), causal, scale))  # writes dq, dk, dv in place
    return dq[..., :head_dim], dk[..., :head_dim], dv[..., :head_dim]
