"""RNG states as tensors, so they travel in the checkpoint's safetensors file.

A bit-exact resume needs the generator to continue where it stopped (dropout,
router jitter, any sampling); the data position itself is the step.
"""
from __future__ import annotations

import warnings

import torch

CPU_KEY = "rng/torch_cpu"
CUDA_KEY = "rng/cuda"


def capture_rng_state() -> dict[str, torch.Tensor]:
    """torch's CPU generator and, when CUDA is initialised, the current device's generator."""
    state = {CPU_KEY: torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state[CUDA_KEY] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Inverse of capture_rng_state; a CUDA state on a machine without CUDA warns and is skipped."""
    if CPU_KEY not in state:
        raise KeyError(f"checkpoint has no {CPU_KEY!r} tensor; cannot resume bit-exactly")
    torch.set_rng_state(state[CPU_KEY].to(torch.uint8).cpu())
    if CUDA_KEY in state:
        if not torch.cuda.is_available():
            warnings.warn(f"checkpoint holds {CUDA_KEY!r} but CUDA is not available; skipped, "
                          "so this run's random stream differs from the saved GPU run")
            return
        torch.cuda.set_rng_state(state[CUDA_KEY].to(torch.uint8).cpu())
