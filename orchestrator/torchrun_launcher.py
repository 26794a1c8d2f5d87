"""`--launcher torchrun`: the same worker loop under torch.distributed.run, without Ray.

One node only: one process per worker (nproc = cluster.num_workers, or its max if elastic),
torchrun's standalone rendezvous, `--max-restarts cluster.max_failures` (torchrun restarts
the whole worker group and the loop resumes from the latest checkpoint; a preempted worker
group, workers/preemption.py, exits non-zero after saving, so it resumes at that step). Several nodes run
on Ray (the default launcher), which places the workers and their rendezvous.
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys

from .config import RunConfig
from .preflight import ClusterSupply, host_cores

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun_command(run: RunConfig, spec_path: str) -> list[str]:
    c = run.schema.cluster
    nproc = max(c.num_workers) if isinstance(c.num_workers, list) else c.num_workers
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
            f"--nproc-per-node={nproc}", f"--max-restarts={c.max_failures}",
            # torchrun's SIGTERM -> SIGKILL wait for its workers: their preemption grace.
            f"--shutdown-timeout={math.ceil(run.schema.checkpoint.preempt_grace_s)}",
            "--monitor-interval=0.5", "-m", "workers.torchrun_main", spec_path]


class TorchrunLauncher:
    def __init__(self, run: RunConfig, spec_path: str, log_path: str):
        self.run, self.spec_path, self.log_path = run, spec_path, log_path
        self.spec = None    # the JobSpec written to spec_path, set by the driver before start()
        self.proc: subprocess.Popen | None = None
        self.error: str | None = None
        self._log = None

    connect_phase = None     # nothing to connect to: torchrun starts its processes here

    def connect(self) -> None:
        pass

    def supply(self) -> ClusterSupply:
        """This machine: GPUs are one per process; CPU processes start whatever the count
        (oversubscription is a warning), so only GPUs are scheduled."""
        import torch

        gpus = float(torch.cuda.device_count()) if self.run.schema.cluster.use_gpu else 0.0
        return ClusterSupply(where="this machine", total={"GPU": gpus}, available={"GPU": gpus},
                             scheduled=("GPU",), host_cores=host_cores())

    def sinks(self, job: str, run_name: str) -> list:
        return []            # no Ray: MLflow and --metrics-jsonl only

    def waiting_for(self) -> str | None:
        return None

    def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
        env.setdefault("OMP_NUM_THREADS", str(max(1, int(self.run.schema.cluster.cpus_per_worker))))
        self._log = open(self.log_path, "ab")
        # Own session: stop() signals torchrun and its workers as one process group.
        self.proc = subprocess.Popen(torchrun_command(self.run, self.spec_path), env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def poll(self) -> int | None:
        rc = self.proc.poll()
        if rc not in (None, 0) and self.error is None:
            self.error = f"torchrun exited with code {rc}; last log lines:\n{self._tail()}"
        return rc

    def _tail(self, lines: int = 25) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as handle:
                return "".join(handle.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout_s: float | None = None) -> None:
        """SIGTERM to torchrun and its workers, which save the step in progress and exit
        (workers/preemption.py); SIGKILL after timeout_s (default checkpoint.preempt_grace_s)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if timeout_s is None:
            timeout_s = self.run.schema.checkpoint.preempt_grace_s
        for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 1.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def close(self) -> None:
        self.stop()
        if self._log is not None:
            self._log.close()
            self._log = None
