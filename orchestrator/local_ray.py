"""The embedded local Ray (no address given): one machine, loopback only, pinned to itself.

`ray.init(address="local")` alone starts a new instance but
- advertises and binds the node's public address: GCS, raylet, object manager and every
  worker's gRPC server listen on it (or on `::`), the metrics agent's Prometheus endpoint
  on 0.0.0.0 without authentication, the runtime-env agent on the public address;
- leaves the processes it starts unpinned: code in them that looks a cluster up without
  an address (the state API behind Ray Train V2's placement-group cleaner and controller)
  reads RAY_ADDRESS, else /tmp/ray/ray_current_cluster, i.e. the newest `ray start`
  cluster on the host, which may be someone else's.

So the node address is loopback (Ray binds its servers to the node address, and the
metrics endpoint and agents to loopback when the node address is loopback); the GCS gets a
port chosen here, and every Ray worker process gets RAY_ADDRESS naming this GCS; gloo and
NCCL use the loopback interface. A driver given an address (multi-node) does none of this:
it binds where that cluster's `ray start` says.
"""
from __future__ import annotations

import contextlib
import os

import ray
from ray._private import ray_constants

from .loopback import LOOPBACK, collective_env, free_loopback_port, is_loopback


@contextlib.contextmanager
def _single_machine_ray(gcs_port: int | None):
    """While ray.init starts (or joins) the node: the node address is loopback, the GCS
    port is ours (None: joining one that runs).

    Ray picks a loopback node address when clusters are off (ENABLE_RAY_CLUSTER, read from
    its env var at import; the processes ray.init starts read the variable, this process
    reads the already-imported constant). An explicit `_node_ip_address="127.0.0.1"` is
    not enough: ray.init replaces a loopback address by the public one."""
    saved_env = {k: os.environ.get(k) for k in (ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR,
                                                 ray_constants.GCS_PORT_ENVIRONMENT_VARIABLE)}
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    if gcs_port is not None:
        os.environ[ray_constants.GCS_PORT_ENVIRONMENT_VARIABLE] = str(gcs_port)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def start_local_ray(num_cpus: int, env_vars: dict[str, str] | None = None, **init_kwargs) -> str:
    """Starts the embedded Ray; returns its GCS address (host:port)."""
    gcs_port = free_loopback_port()
    gcs_address = f"{LOOPBACK}:{gcs_port}"
    worker_env = {**collective_env(), **(env_vars or {}),
                  ray_constants.RAY_ADDRESS_ENVIRONMENT_VARIABLE: gcs_address}
    # The dashboard stays on (loopback): Ray Train V2's placement-group cleaner and the
    # state API need it, and it is the place to watch the job.
    init_kwargs.setdefault("log_to_driver", False)
    with _single_machine_ray(gcs_port):
        ray.init(address="local", num_cpus=num_cpus, dashboard_host=LOOPBACK,
                 runtime_env={"env_vars": worker_env}, **init_kwargs)
    return gcs_address


def join_ray(address: str, **init_kwargs) -> None:
    """ray.init(address=...). A loopback address (a Ray that a foldmoe driver or test on this
    machine started loopback-only) is joined in the same single-machine mode: otherwise Ray
    replaces 127.0.0.1 by the host's public address, on which that GCS does not listen."""
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    if is_loopback(host) or host == "localhost":
        with _single_machine_ray(None):
            ray.init(address=address, **init_kwargs)
    else:
        ray.init(address=address, **init_kwargs)
