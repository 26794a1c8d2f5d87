"""A multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: one raylet per
node), run in a process of its own and driven line by line over stdin/stdout.

Own process, own process group, own temp dir: the test process stays free to use the
session's single-node Ray (`tests/conftest.py`), the token (RAY_AUTH_MODE=token) reaches
every raylet of this cluster and no other, and killing the process group ends every
raylet whatever state the test left it in.

    python tests/orchestrator/ray_nodes.py TEMP_DIR NODES CPUS_PER_NODE
    -> {"address": GCS, "dashboard": URL, "nodes": N}    once the nodes are up
    <- remove   -> {"removed": NODE_ID, "time": T}     the newest worker node is killed
    <- add      -> {"added": NODE_ID, "time": T}       one more worker node of CPUS_PER_NODE
    <- quit (or EOF)                                    every node is shut down

The head has no CPUs: nothing of a job can be placed there but the driver-pinned actors
(the Ray Train controller), so a worker node can be removed without touching them.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def say(**fields) -> None:
    print(json.dumps(fields), flush=True)


def main(temp_dir: str, nodes: int, cpus_per_node: int) -> None:
    # Cluster.add_node writes the head's address to $RAY_TMPDIR/ray/ray_current_cluster (the
    # host-wide /tmp/ray by default, which a fresh machine lacks): keep it in our temp dir, so
    # it neither fails there nor repoints `ray.init()` of anyone else on the host.
    os.environ["RAY_TMPDIR"] = temp_dir
    os.makedirs(os.path.join(temp_dir, "ray"), exist_ok=True)
    from ray.cluster_utils import Cluster

    dashboard_port = free_port()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "temp_dir": temp_dir, "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port})
    try:
        workers = [cluster.add_node(num_cpus=cpus_per_node) for _ in range(nodes)]
        cluster.wait_for_nodes()
        say(address=cluster.address, dashboard=f"http://127.0.0.1:{dashboard_port}",
            nodes=len(workers))
        for line in sys.stdin:
            command = line.strip()
            if command == "remove":
                node = workers.pop()
                cluster.remove_node(node, allow_graceful=False)
                say(removed=node.node_id, time=time.time())
            elif command == "add":
                workers.append(cluster.add_node(num_cpus=cpus_per_node))
                say(added=workers[-1].node_id, time=time.time())
            elif command == "quit":
                break
            else:
                say(error=f"unknown command {command!r}")
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
