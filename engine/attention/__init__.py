"""Attention block backends (cpu, math, flash_attn, triton) behind one interface, and the local core."""
from .backends import BACKEND_NAMES, BackendUnavailableError, available_backends, resolve_backend
from .block import block_backward, block_forward, expand_kv_heads, reduce_kv_heads
from .core import AttentionCounters, LocalAttention

__all__ = [
    "BACKEND_NAMES", "BackendUnavailableError", "available_backends", "resolve_backend",
    "block_forward", "block_backward", "expand_kv_heads", "reduce_kv_heads",
    "AttentionCounters", "LocalAttention",
]
