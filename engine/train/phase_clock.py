"""Where the time of one training step goes (data, forward+backward, grad sync, optimizer,
metrics), without adding a host synchronisation.

On CPU a mark is a perf_counter reading. On CUDA it is an event recorded on the current
stream, read only after the step's own synchronisation (the loss `.item()` at the end of
the step), so the clock never stalls the pipeline of queued kernels.
"""
from __future__ import annotations

import time

import torch


class PhaseClock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._marks: list[tuple[str, object]] = []

    def start(self) -> None:
        self._marks = [("", self._now())]

    def mark(self, phase: str) -> None:
        """Ends `phase` (it ran since the previous mark)."""
        self._marks.append((phase, self._now()))

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self) -> dict[str, float]:
        """{phase: seconds}; call after the step has synchronised with the device."""
        if self.cuda:   # the last mark follows the step's sync: waiting for it is free
            self._marks[-1][1].synchronize()
        out = {}
        for (_, before), (phase, after) in zip(self._marks, self._marks[1:]):
            out[phase] = (before.elapsed_time(after) / 1e3 if self.cuda else after - before)
        return out
