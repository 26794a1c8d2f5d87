"""Counts reads of tensor values to the host (device-to-host synchronisations on a GPU).

Every Tensor method that hands a value to Python is wrapped for the duration of the
context: item, tolist, cpu, numpy, and the conversions bool(), int(), float() and index
use. On a CPU-only machine this counts the reads that would stall a GPU stream, so the
bounds of the MoE layer (at most one per all-to-all forward) are testable without a GPU.
"""
from __future__ import annotations

import traceback

import torch

READ_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


class HostReadCounter:
    """`with HostReadCounter() as reads: ...`, then `reads.count` and `reads.sites`."""

    def __init__(self) -> None:
        self.count = 0
        self.sites: list[str] = []
        self._saved: dict[str, object] = {}

    def _wrap(self, name: str, original):
        def counted(tensor, *args, **kwargs):
            self.count += 1
            frame = traceback.extract_stack(limit=2)[0]   # the caller
            self.sites.append(f"{name} at {frame.filename}:{frame.lineno}")
            return original(tensor, *args, **kwargs)
        return counted

    def __enter__(self) -> "HostReadCounter":
        for name in READ_METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = torch.Tensor.__dict__.get(name)
            setattr(torch.Tensor, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc) -> None:
        for name, saved in self._saved.items():
            if saved is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, saved)
