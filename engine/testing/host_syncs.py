"""Counts reads of tensor values to the host (device-to-host synchronisations on a GPU).

Every Tensor method that hands a value to Python is wrapped for the duration of the
context: item, tolist, cpu, numpy, and the conversions bool(), int(), float() and index
use. On a CPU-only machine this counts the reads that would stall a GPU stream, so the
bounds of the MoE layer (at most one per all-to-all forward) are testable without a GPU.
"""
from __future__ import annotations

import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


class HostDataCounter(TorchDispatchMode):
    """`with HostDataCounter() as built: ...`, then `built.sites`: every tensor made from
    Python data (`torch.tensor`, `new_tensor`: aten.lift_fresh). On a GPU each is a copy
    from pageable host memory, which PyTorch completes with a stream synchronisation, so a
    hot path should make none; `torch.full` / `arange` on the device launch a kernel instead."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.lift_fresh.default:
            frame = next((f for f in reversed(traceback.extract_stack()[:-1])
                          if "torch" not in f.filename.split("/site-packages/")[-1].split("/")[0]), None)
            self.sites.append(f"{frame.filename}:{frame.lineno}" if frame else "?")
        return func(*args, **(kwargs or {}))
