"""Attention block backends by name, with automatic choice and clear errors.

Every backend module exposes NAME, NATIVE_GQA, is_available(), forward(q, k, v, causal, scale) ->
(out_bsnd, lse_bns) and backward(dout, q, k, v, out, lse, causal, scale) -> (dq, dk, dv), all in
[b, s, n, d] layout with bottom-right aligned causal masks.
"""
from __future__ import annotations

import warnings
from functools import lru_cache

import torch

from . import cpu_backend, flash_attn_backend, math_backend, triton_backend

BACKEND_NAMES = ("auto", "cpu", "math", "flash_attn", "triton")
_MODULES = {m.NAME: m for m in (cpu_backend, math_backend, flash_attn_backend, triton_backend)}
_DEVICE_TYPE = {"cpu": "cpu", "flash_attn": "cuda", "triton": "cuda"}


class BackendUnavailableError(RuntimeError):
    """The requested attention backend cannot run here (not installed, wrong device or dtype)."""


@lru_cache(maxsize=None)
def _installed(name: str) -> bool:
    return name == "math" or _MODULES[name].is_available()


_HEAD_DIMS = {"flash_attn": flash_attn_backend.HEAD_DIMS, "triton": triton_backend.HEAD_DIMS}


def _unavailable_reason(name: str, device: torch.device, dtype: torch.dtype,
                        head_dim: int | None = None) -> str | None:
    if not _installed(name):
        return "not installed or no CUDA device" if name in ("flash_attn", "triton") else "not in this torch"
    wanted = _DEVICE_TYPE.get(name)
    if wanted is not None and device.type != wanted:
        return f"needs {wanted} tensors, got {device.type}"
    if name == "flash_attn" and dtype not in flash_attn_backend.HALF_DTYPES:
        return f"needs float16/bfloat16, got {dtype}"
    if head_dim is not None and name in _HEAD_DIMS and head_dim not in _HEAD_DIMS[name]:
        return f"no kernel for head dim {head_dim}"
    return None


def _auto_choice(device: torch.device, dtype: torch.dtype, head_dim: int | None) -> str:
    order = ("flash_attn", "triton", "math") if device.type == "cuda" else ("cpu", "math")
    return next(name for name in order if _unavailable_reason(name, device, dtype, head_dim) is None)


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype, head_dim: int | None = None):
    """The backend module for `name` ("auto" picks flash_attn > triton > math on CUDA, cpu on
    CPU, skipping a kernel that has no variant for `head_dim`)."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"attention backend {name!r}: expected one of {BACKEND_NAMES}")
    if name == "auto":
        name = _auto_choice(device, dtype, head_dim)
        if name == "math" and device.type == "cuda":
            _warn_math_on_cuda(dtype, head_dim)
    reason = _unavailable_reason(name, device, dtype, head_dim)
    if reason is not None:
        raise BackendUnavailableError(f"attention backend {name!r} is unavailable: {reason}")
    return _MODULES[name]


@lru_cache(maxsize=None)
def _warn_math_on_cuda(dtype: torch.dtype, head_dim: int | None) -> None:
    """Once per (dtype, head dim): math builds the [b, n, s, s] scores in fp32, so a long
    sequence needs O(s^2) memory (32 GB a tensor at 32K tokens and 8 heads)."""
    reasons = {n: _unavailable_reason(n, torch.device("cuda"), dtype, head_dim) for n in ("flash_attn", "triton")}
    warnings.warn("attention backend auto chose math on CUDA (O(seq^2) memory: "
                  + "; ".join(f"{n}: {r}" for n, r in reasons.items())
                  + "); install flash-attn or use a head dim of 16/32/64/128 for the Triton kernel",
                  RuntimeWarning, stacklevel=3)


def available_backends(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> list[str]:
    device = torch.device(device)
    return [n for n in BACKEND_NAMES[1:] if _unavailable_reason(n, device, dtype) is None]
