"""The processes `foldmoe plan --calibrate` measures on: one per worker of this machine, on
the device and collective backend the machine has (NCCL on GPUs, gloo on CPUs).

- CPU: `world` processes (2 by default), one thread each (`cluster.cpus_per_worker: 1`),
  gloo over loopback TCP: the collectives a CPU run uses;
- GPU: one process per visible GPU (`torch.cuda.device_count()`, at least 2: a collective
  needs a peer), each on its own device, NCCL: the node's NVLink. The network between
  nodes is not measured (one node); the planner keeps the datasheet's figure for it.
Every rank runs `fn(rank, world, device, *args)`; the parent returns the per-rank results
(torch.save'd by each child: plain numbers, lists and dicts). A rank that fails or a run
past `timeout_s` raises in the parent with the child's traceback; no child is left alive.
"""
from __future__ import annotations

from typing import Any, Callable

from engine.train.host_allocator import retain_freed_host_memory


class CalibrationUnavailable(RuntimeError):
    """The requested device is not on this machine (e.g. `--calibrate --gpu h100` on a CPU host)."""


def backend_for(device: str) -> str:
    """The collective backend the engine runs on `device` ("cuda": NCCL, "cpu": gloo)."""
    return "nccl" if device == "cuda" else "gloo"


def calibration_world(device: str, requested: int) -> int:
    """Processes to measure on: `requested` CPU workers, or every GPU of this node."""
    if device != "cuda":
        return requested
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        raise CalibrationUnavailable(f"NCCL calibration needs at least 2 visible GPUs on this machine, "
                                     f"found {count}; omit --calibrate to use the datasheet row")
    return count


def _on_cpu_worker_allocator(rank: int, world: int, fn: Callable, device: str, *args: Any) -> Any:
    if device != "cuda":
        retain_freed_host_memory()        # as a CPU training worker runs (workers/loop.py)
    return fn(rank, world, device, *args)


def run_ranks(fn: Callable[..., Any], world: int, device: str, *args: Any,
              timeout_s: float = 900.0, pg_timeout_s: float = 300.0) -> list[Any]:
    """fn(rank, world, device, *args) on `world` spawned processes (module docstring)."""
    from engine.parallel.spawn import spawn_ranks     # torch: only when measuring

    return spawn_ranks(_on_cpu_worker_allocator, world, (fn, device, *args), device=device,
                       timeout_s=timeout_s, pg_timeout_s=pg_timeout_s, what="calibration")
