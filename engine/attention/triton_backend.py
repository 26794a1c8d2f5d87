"""Triton backend: adapter to `engine.attention.triton_flash` (bsnd layout, GQA, causal bottom-right)."""
from __future__ import annotations

import importlib

import torch

NAME = "triton"
NATIVE_GQA = True
HEAD_DIMS = (16, 32, 64, 128)   # engine.attention.triton_flash.SUPPORTED_HEAD_DIMS (imports triton)


def _kernels():
    return importlib.import_module("engine.attention.triton_attention")  # lazy: needs triton + CUDA


def is_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        kernels = _kernels()
    except Exception:  # noqa: BLE001 - missing triton or a broken kernel module
        return False
    return hasattr(kernels, "triton_attention_forward") and hasattr(kernels, "triton_attention_backward")


def forward(q_bsnd, k_bsnd, v_bsnd, causal: bool, scale: float):
    return _kernels().triton_attention_forward(q_bsnd, k_bsnd, v_bsnd, causal, scale)


def backward(dout_bsnd, q_bsnd, k_bsnd, v_bsnd, out_bsnd, lse_bns, causal: bool, scale: float):
    return _kernels().triton_attention_backward(dout_bsnd, q_bsnd, k_bsnd, v_bsnd, out_bsnd, lse_bns,
                                                causal, scale)
