"""Keep freed host memory inside a CPU training process (glibc malloc settings).

PyTorch's CPU allocator is plain malloc, with no cache. glibc serves a request above
M_MMAP_THRESHOLD with a mapping of its own and unmaps it on free; the threshold rises after
such frees but never above 32 MiB (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit). So every tensor
above 32 MiB is mapped afresh and page-faulted in, 4 KiB at a time and zero-filled by the
kernel, each time it is allocated. A [E, h, F] expert weight-gradient stack is such a tensor
(64 x 512 x 384 fp32 is 50 MB); three of them per MoE layer and step made the grouped expert
FFN 1.45x a dense GEMM of the same FLOPs instead of 1.10x (benchmarks/experts.py,
docs/performance.md).

A fixed mmap threshold above any tensor and a trim threshold as large make glibc serve big
blocks from its heap and keep the freed ones for the next step, as the CUDA caching allocator
(or jemalloc/tcmalloc preloaded) does: the process holds on to its peak footprint. A user's
own glibc settings (MALLOC_*_ environment variables or GLIBC_TUNABLES) are left alone, and
FOLDMOE_HOST_MALLOC=default turns this off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

ENV_SWITCH = "FOLDMOE_HOST_MALLOC"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4     # glibc <malloc.h>
RETAIN_BYTES = 1 << 30
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_")

_applied: str | None = None


def _user_chose_malloc_settings() -> str | None:
    if os.environ.get(ENV_SWITCH, "").lower() == "default":
        return f"{ENV_SWITCH}=default"
    for name in _USER_SETTINGS:
        if name in os.environ:
            return name
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in tunables:
        return "GLIBC_TUNABLES"
    return None


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def retain_freed_host_memory() -> str:
    """Makes glibc keep freed large blocks for reuse; returns what was done, in words.

    Process-wide and idempotent: call it once the process knows it trains on the CPU."""
    global _applied
    if _applied is not None:
        return _applied
    reason = _user_chose_malloc_settings()
    libc = None if reason else _glibc()
    if reason:
        _applied = f"left to the user ({reason})"
    elif libc is None:
        _applied = "not glibc: allocator unchanged"
    else:
        _applied = _pin_thresholds(libc)
    return _applied


def _pin_thresholds(libc: ctypes.CDLL) -> str:
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    trimmed = libc.mallopt(M_TRIM_THRESHOLD, RETAIN_BYTES)
    if libc.mallopt(M_MMAP_THRESHOLD, RETAIN_BYTES) and trimmed:
        return f"glibc keeps freed blocks up to {RETAIN_BYTES >> 20} MiB"
    # Some glibc builds refuse a threshold above half their arena heap size: then no
    # mmap at all, so every block comes from (and returns to) the heap.
    if libc.mallopt(M_MMAP_MAX, 0) and trimmed:
        return "glibc keeps freed blocks (mmap off)"
    return "glibc refused the settings: allocator unchanged"
