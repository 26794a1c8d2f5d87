"""Wall time a process spends inside torch.distributed collectives (waiting included).

Wraps the collectives the engine calls: a blocking call is timed whole, an asynchronous one
(async_op=True, batch_isend_irecv) by the wait() on the work it returns, so the time is
what the caller's thread loses to communication and to waiting for slower ranks - the
cost a GPU stream would see as a stall. Nested calls (torch's deprecated names forward to
the new ones) count once. Install in the process before the first step.
"""
from __future__ import annotations

import time

import torch.distributed as dist

NAMES = ("all_reduce", "all_to_all_single", "all_gather_single", "all_gather_into_tensor",
         "reduce_scatter_single", "reduce_scatter_tensor", "all_gather", "broadcast",
         "batch_isend_irecv", "barrier")


class _TimedWork:
    def __init__(self, work, timer: "CollectiveTimer"):
        self._work, self._timer = work, timer

    def wait(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            self._timer.seconds += time.perf_counter() - start

    def __getattr__(self, name):
        return getattr(self._work, name)


class CollectiveTimer:
    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._depth = 0

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            self.calls += 1
            start = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
            finally:
                self._depth -= 1
                self.seconds += time.perf_counter() - start
            if isinstance(out, list):
                return [_TimedWork(w, self) for w in out]
            return _TimedWork(out, self) if out is not None else None
        return timed

    def install(self) -> "CollectiveTimer":
        for name in NAMES:
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(getattr(dist, name)))
        from engine.optim import comm   # captured the flat collectives at import time
        comm._reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        comm._all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        return self

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0
