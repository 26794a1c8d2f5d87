"""Asynchronous checkpoint writes: copy this rank's state to host memory, write it in a thread.

Training stalls only for the copy (`HostSnapshot`); the safetensors write, the fsyncs, the
SHA-256 and, on rank 0, the manifest and the atomic rename run in one `BackgroundWrite`
thread per rank. The thread runs no collective: process groups are not safe to drive from
two threads at once (and the step's collectives keep running), so rank 0 learns that every
rank's files are on disk from their hash records appearing in the checkpoint's temp
directory (each written with an atomic os.replace), the shared filesystem the checkpoint
directory already needs. One write is in flight per rank at a time: the next save (or the
exit) waits for it first.
"""
from __future__ import annotations

import copy
import os
import threading
import time
from typing import Callable

import torch

_POLL_S = 0.02


class HostSnapshot:
    """Copies a state dict's tensors into host buffers that it keeps and reuses.

    The buffers are pinned on CUDA (page-locked: the device-to-host copies run at full
    bus speed and can be queued without blocking, then one synchronize), plain on CPU,
    where the copy is the only way to keep the live parameters free to change."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def copy(self, state: dict) -> dict:
        tensors, on_device = {}, False
        for name, tensor in state["tensors"].items():
            tensor = tensor.detach()
            buffer = self._buffer(name, tensor)
            on_device |= tensor.device.type == "cuda"
            buffer.copy_(tensor, non_blocking=tensor.device.type == "cuda")
            tensors[name] = buffer
        if on_device:
            torch.cuda.synchronize()
        return {**copy.deepcopy({k: v for k, v in state.items() if k != "tensors"}),
                "tensors": tensors}

    def _buffer(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        held = self._buffers.get(name)
        if held is None or held.shape != tensor.shape or held.dtype != tensor.dtype:
            pin = tensor.device.type == "cuda"
            held = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)
            self._buffers[name] = held
        return held


class BackgroundWrite:
    """Runs `job` in a thread (thread=False: right here, the synchronous save, timed the
    same way); `wait()` joins it and re-raises what it raised."""

    def __init__(self, step: int, job: Callable[[], None], *, thread: bool = True):
        self.step = step
        self.seconds: float | None = None
        self._error: BaseException | None = None
        self._thread = None
        if thread:
            self._thread = threading.Thread(target=self._run, args=(job,), daemon=True,
                                            name=f"checkpoint-write-step{step}")
            self._thread.start()
        else:
            self._run(job)

    def _run(self, job: Callable[[], None]) -> None:
        start = time.perf_counter()
        try:
            job()
        except BaseException as err:  # noqa: BLE001 - re-raised by wait() in the caller's thread
            self._error = err
        self.seconds = time.perf_counter() - start

    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    @property
    def error(self) -> BaseException | None:
        """What the write raised (None while running, or when it succeeded)."""
        return self._error if self.done() else None

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def wait_for_files(paths: list[str], timeout_s: float, what: str) -> None:
    """Polls until every path exists; TimeoutError naming the first missing one."""
    deadline = time.monotonic() + timeout_s
    missing = list(paths)
    while missing:
        missing = [p for p in missing if not os.path.exists(p)]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{missing[0]}: not written after {timeout_s:.0f}s ({what})")
        time.sleep(_POLL_S)
