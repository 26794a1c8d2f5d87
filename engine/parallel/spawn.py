"""Run a function on N spawned ranks of one machine and collect each rank's result.

Each child joins a process group over loopback TCP (gloo on CPU, NCCL with one GPU per rank),
runs fn(rank, world, *args) and torch.save's its result (or its traceback) for the parent. A
run past `timeout_s` raises TimeoutError, a failed rank RuntimeError with its traceback, and
no child is left alive. Used by the multi-process tests (engine/testing/multiprocess.py) and
by the planner's calibration (engine/planner/calibrate_ranks.py).
"""
from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, device: str, fn: Callable, args: tuple,
               result_dir: str, pg_timeout_s: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    kwargs = {}
    if device == "cuda":
        torch.cuda.set_device(rank)
        kwargs["device_id"] = torch.device("cuda", rank)
    else:
        torch.set_num_threads(1)
    path = os.path.join(result_dir, f"rank{rank}.pt")
    try:
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=timedelta(seconds=pg_timeout_s), **kwargs)
        torch.save({"ok": True, "result": fn(rank, world, *args)}, path)
    except BaseException:  # noqa: BLE001 - reported to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_ranks(fn: Callable[..., Any], world: int, args: tuple = (), *, device: str = "cpu",
                timeout_s: float, pg_timeout_s: float, what: str) -> list[Any]:
    """fn(rank, world, *args) on `world` spawned processes; `what` names the run in errors.

    fn must be importable (module level); results must be picklable by torch.save."""
    with tempfile.TemporaryDirectory() as result_dir:
        ctx = mp.start_processes(_rank_main, args=(world, free_port(), device, fn, args, result_dir,
                                                   pg_timeout_s),
                                 nprocs=world, join=False, start_method="spawn")
        _join(ctx, timeout_s, what)
        return [_load(result_dir, rank, what) for rank in range(world)]


def _join(ctx, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not finish within {timeout_s:.0f}s (hang?)")
    except mp.ProcessRaisedException as exc:
        raise RuntimeError(f"a rank of the {what} failed:\n{exc}") from None
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()


def _load(result_dir: str, rank: int, what: str) -> Any:
    path = os.path.join(result_dir, f"rank{rank}.pt")
    if not os.path.exists(path):
        raise RuntimeError(f"rank {rank} of the {what} exited without a result")
    payload = torch.load(path, weights_only=False)  # written by our own child process
    if not payload["ok"]:
        raise RuntimeError(f"rank {rank} of the {what} failed:\n{payload['error']}")
    return payload["result"]
