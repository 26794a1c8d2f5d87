"""Ray Train's torch process group, with its rendezvous store on loopback (embedded Ray).

Ray Train's TorchConfig lets rank 0 open a TCPStore on MASTER_ADDR:MASTER_PORT, and a
TCPStore that opens its own socket listens on every interface (`::`), whatever the host.
On the embedded one-machine Ray every worker is on this machine, so here rank 0 binds the
socket to 127.0.0.1 itself and hands it to TCPStore (master_listen_fd); the other ranks
connect to it; then each rank joins the process group on that store. The rest (backend,
timeout, shutdown) is Ray Train's own TorchConfig. A driver connected to a multi-node
cluster keeps the plain TorchConfig, which rendezvous on the node address.
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch.distributed as dist
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

LOOPBACK = "127.0.0.1"
_held: dict[str, socket.socket] = {}     # rank 0's bound socket, until its store takes it


def bind_store_socket() -> int:
    """On rank 0: a listening loopback socket for the store; returns its port."""
    sock = socket.create_server((LOOPBACK, 0))
    _held["store"] = sock
    return sock.getsockname()[1]


def join_process_group(backend: str, world_rank: int, world_size: int, port: int,
                       timeout_s: int) -> None:
    timeout = timedelta(seconds=timeout_s)
    os.environ.update({"MASTER_ADDR": LOOPBACK, "MASTER_PORT": str(port)})
    if backend == "nccl":
        # As Ray Train does: a timed-out NCCL collective fails instead of hanging.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if world_rank == 0:
        store = dist.TCPStore(LOOPBACK, port, world_size, True, timeout=timeout,
                              wait_for_workers=False, master_listen_fd=_held.pop("store").detach())
    else:
        store = dist.TCPStore(LOOPBACK, port, world_size, False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=world_rank, world_size=world_size,
                            timeout=timeout)


class _LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: "LoopbackTorchConfig") -> None:
        port = worker_group.execute_single(0, bind_store_socket)
        worker_group.execute(_set_torch_distributed_env_vars)
        import ray

        ray.get([worker_group.execute_single_async(
            rank, join_process_group, backend=backend_config.backend, world_rank=rank,
            world_size=len(worker_group), port=port, timeout_s=backend_config.timeout_s)
            for rank in range(len(worker_group))])


class LoopbackTorchConfig(TorchConfig):
    """TorchConfig whose rendezvous store listens on 127.0.0.1 (one-machine Ray only)."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend
