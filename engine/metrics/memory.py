"""Measured memory: the peak a process reached, and the bytes of the parameters it holds.

On CUDA the peak is torch's `max_memory_allocated` (the caching allocator's own count, not
the reserved pool). On CPU it is the peak resident set size of the process (VmHWM on Linux,
which `/proc/self/clear_refs` can reset, so a phase such as the model build can be measured
on its own; elsewhere `ru_maxrss`, the lifetime peak).
"""
from __future__ import annotations

import resource
import sys

import torch
from torch import nn

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _vm_hwm_bytes() -> int | None:
    try:
        with open(_STATUS, encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_memory(device: torch.device) -> None:
    """Starts a new peak measurement (best effort on CPU: Linux only)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open(_CLEAR_REFS, "w", encoding="ascii") as handle:
            handle.write("5")   # resets VmHWM to the current RSS (proc(5), clear_refs)
    except OSError:
        pass


def peak_memory_bytes(device: torch.device) -> int:
    """Peak since the last reset: allocated device memory on CUDA, resident memory on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    hwm = _vm_hwm_bytes()
    if hwm is not None:
        return hwm
    scale = 1 if sys.platform == "darwin" else 1024   # ru_maxrss: bytes on macOS, KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def param_bytes(modules: list[nn.Module]) -> int:
    """Bytes of the parameters these modules hold (each tensor counted once)."""
    seen, total = set(), 0
    for module in modules:
        for param in module.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                total += param.numel() * param.element_size()
    return total
