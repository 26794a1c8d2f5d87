"""Driver side of test_remote_kill.py, run in a process of its own joined to the multi-node
cluster ($RAY_ADDRESS): a Ray actor on a worker node starts a rank's heartbeat, is
SIGSTOPped (a hung rank), and the watchdog's kill_rank signals it from this driver, which
runs on the head node. Writes JOB_DIR/result.json.

    python tests/orchestrator/remote_kill_case.py JOB_DIR
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time

import ray

from orchestrator.watchdog import kill_rank
from workers.heartbeat import Heartbeat, heartbeat_path, ray_node_id, read_heartbeat


@ray.remote(num_cpus=1)
class Rank:
    def start(self, job_dir: str) -> int:
        self.heartbeat = Heartbeat(job_dir, rank=0, world_size=1).start()
        return os.getpid()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def main(job_dir: str) -> None:
    ray.init()
    actor = Rank.remote()
    pid = ray.get(actor.start.remote(job_dir), timeout=120)
    path = heartbeat_path(job_dir, 0)
    deadline = time.monotonic() + 30
    while read_heartbeat(path) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    beat = read_heartbeat(path)
    os.kill(pid, signal.SIGSTOP)
    start = time.monotonic()
    message = kill_rank(beat)
    seconds = time.monotonic() - start
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    result = {"pid": pid, "beat_node": beat.get("node_id"), "driver_node": ray_node_id(),
              "message": message, "kill_s": seconds, "alive": _alive(pid)}
    # A file, not stdout: Ray forwards the raylet's note of the killed worker to this
    # driver's output at any moment.
    with open(os.path.join(job_dir, "result.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1])
