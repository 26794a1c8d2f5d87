"""Multi-process harness: run a function on N gloo ranks and collect each rank's result.

A hang fails with a TimeoutError instead of blocking CI; an exception on any rank is
re-raised in the caller with that rank's traceback.
"""
from __future__ import annotations

import os
import socket
import tempfile
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


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple,
            result_dir: str, pg_timeout_s: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    path = os.path.join(result_dir, f"rank{rank}.pt")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=pg_timeout_s))
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, path)
    except BaseException:  # noqa: BLE001 - reported to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any,
                    timeout_s: float = 240.0, pg_timeout_s: float = 60.0) -> list[Any]:
    """Runs fn(rank, world_size, *args) on world_size spawned gloo processes.

    fn must be importable (module level). Results must be picklable by torch.save
    (tensors, numbers, lists, dicts). Returns the list of per-rank results.
    """
    with tempfile.TemporaryDirectory() as result_dir:
        ctx = mp.start_processes(
            _worker, args=(world_size, free_port(), fn, args, result_dir, pg_timeout_s),
            nprocs=world_size, join=False, start_method="spawn")
        _join(ctx, timeout_s)
        return [_load(result_dir, rank) for rank in range(world_size)]


def _join(ctx, timeout_s: float) -> None:
    import time
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed test did not finish within {timeout_s:.0f}s (hang?)")
    except mp.ProcessRaisedException as exc:
        raise RuntimeError(f"a rank failed:\n{exc}") from None
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()


def _load(result_dir: str, rank: int) -> Any:
    path = os.path.join(result_dir, f"rank{rank}.pt")
    if not os.path.exists(path):
        raise RuntimeError(f"rank {rank} exited without a result")
    payload = torch.load(path, weights_only=False)  # written by our own child process
    if not payload["ok"]:
        raise RuntimeError(f"rank {rank} failed:\n{payload['error']}")
    return payload["result"]
