"""Measures the memory of a built Trainer from outside, for checking the memory model.

- Static bytes are read from the optimizer's real tensors: the flat parameter buffers
  (model dtype, padded), the fp32 gradient buffers, and the fp32 master copies and Adam
  moments of the range this rank owns (engine/optim/flat_bucket.py).
- Step bytes are the peak, during one `train_step`, of the bytes of every tensor storage
  that an operator created during the step and that is still alive (activations saved
  for backward, pipeline buffers, dispatcher buffers, gradients in flight, temporaries).
  A TorchDispatchMode sees every operator's outputs, forward and backward; a storage's
  Python object lives exactly as long as the storage itself (PyTorch keeps one wrapper
  per storage), so `weakref.finalize` on it reports the free. This is the CPU analogue
  of CUDA's `max_memory_allocated() - memory_allocated()` over a step, without the
  allocator's rounding and caching.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveStorageTracker(TorchDispatchMode):
    """Peak bytes of storages created by operators while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._live: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._live.discard(key)
        self.live_bytes -= nbytes

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        key = id(storage)
        if nbytes == 0 or key in self._live:
            return
        self._live.add(key)
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(storage, self._release, key, nbytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and id(leaf.untyped_storage()) not in inputs:
                self._track(leaf)
        return out


def static_bytes(trainer) -> dict[str, int]:
    """Bytes of the parameters, fp32 main grads and optimizer state this rank holds."""
    params = grads = optimizer = 0
    for bucket in trainer.optimizer.buckets:
        params += bucket.param_buffer.nbytes
        grads += bucket.grad_buffer.nbytes
        optimizer += bucket.exp_avg.nbytes + bucket.exp_avg_sq.nbytes
        if bucket.separate_main:
            optimizer += bucket.main_param.nbytes
    return {"params": params, "grads": grads, "optimizer": optimizer}


def measure_step(trainer, step: int, global_tokens: torch.Tensor) -> dict[str, int]:
    """Static bytes plus the peak step bytes of one `train_step` (run under the tracker)."""
    out = static_bytes(trainer)
    with LiveStorageTracker() as tracker:
        trainer.train_step(step, global_tokens)
    out["activations"] = tracker.peak_bytes
    out["total"] = out["params"] + out["grads"] + out["optimizer"] + out["activations"]
    return out
