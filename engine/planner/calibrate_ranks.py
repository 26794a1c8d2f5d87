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

import os
import socket
import tempfile
import time
import traceback
from datetime import timedelta
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, device: str, fn: Callable, args: tuple,
               result_dir: str, pg_timeout_s: float) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    kwargs = {}
    if device == "cuda":
        torch.cuda.set_device(rank)
        kwargs["device_id"] = torch.device("cuda", rank)
    else:
        torch.set_num_threads(1)
        retain_freed_host_memory()        # as a CPU training worker runs (workers/loop.py)
    path = os.path.join(result_dir, f"rank{rank}.pt")
    try:
        dist.init_process_group(backend_for(device), rank=rank, world_size=world,
                                timeout=timedelta(seconds=pg_timeout_s), **kwargs)
        torch.save({"ok": True, "result": fn(rank, world, device, *args)}, path)
    except BaseException:  # noqa: BLE001 - reported to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world: int, device: str, *args: Any,
              timeout_s: float = 900.0, pg_timeout_s: float = 300.0) -> list[Any]:
    """fn(rank, world, device, *args) on `world` spawned processes (module docstring)."""
    import torch
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as result_dir:
        ctx = mp.start_processes(_rank_main, args=(world, _free_port(), device, fn, args, result_dir,
                                                   pg_timeout_s),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"calibration did not finish within {timeout_s:.0f} s")
        except mp.ProcessRaisedException as exc:
            raise RuntimeError(f"a calibration rank failed:\n{exc}") from None
        finally:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
        out = []
        for rank in range(world):
            payload = torch.load(os.path.join(result_dir, f"rank{rank}.pt"), weights_only=True)
            if not payload["ok"]:
                raise RuntimeError(f"calibration rank {rank} failed:\n{payload['error']}")
            out.append(payload["result"])
        return out
