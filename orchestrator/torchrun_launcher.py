"""`--launcher torchrun`: the same worker loop on this machine, without Ray.

One node only: one process per worker (nproc = cluster.num_workers, or its max if
elastic), each started as `python -m workers.torchrun_main SPEC.json` with the environment
torchrun gives its workers (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT,
TORCHELASTIC_USE_AGENT_STORE, TORCHELASTIC_RESTART_COUNT), so the same entrypoint also runs
under a user's own `torchrun --nnodes ...` on several nodes.

Why foldmoe supervises the group instead of `python -m torch.distributed.run`:
- torchrun's in-place restart re-rendezvouses on the store of the failed group; after a
  SIGKILLed worker every restart died in init_process_group ("Gloo connectFullMesh
  failed ... Connection refused") or hung (issue 15). Here a failed group is torn down
  completely (every worker's process group SIGTERMed, then SIGKILLed, all reaped) and the
  next one gets a fresh rendezvous: a new TCPStore on a new port. With torchrun's
  restarts off (--max-restarts=0) all torchrun would add is this environment and "stop
  the others when one dies", which is what this file does.
- torchrun's rendezvous store listens on every interface (TCPStore binds `::` when it
  opens its own socket, and torchrun has no option to hand it one). Here the store is
  hosted by the driver, as torchrun's agent hosts it, on a socket bound to 127.0.0.1.

Failures follow Ray Train's FailureConfig(max_failures): the group is restarted after each
of the first max_failures failures, and the job fails at the next one. Each failure is a
"failure" event in the controller's event file, as the Ray Train callback writes it, so the
driver reports both launchers alike. The workers resume from the newest checkpoint; a
preempted group (workers/preemption.py) saved the step in progress and exits with
EXIT_PREEMPTED, so it resumes at that step.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta

from workers.events import EventWriter
from workers.preemption import EXIT_PREEMPTED

from .config import RunConfig
from .loopback import LOOPBACK, collective_env
from .preflight import ClusterSupply, host_cores

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WATCH_INTERVAL_S = 0.1
TERM_GRACE_S = 2.0     # SIGTERM -> SIGKILL for the survivors of a failed group


def worker_command(spec_path: str) -> list[str]:
    return [sys.executable, "-m", "workers.torchrun_main", spec_path]


def nproc_of(run: RunConfig) -> int:
    c = run.schema.cluster
    return max(c.num_workers) if isinstance(c.num_workers, list) else c.num_workers


class Rendezvous:
    """One worker group's TCPStore, hosted in this process on a fresh loopback port.

    TCPStore opening its own socket binds every interface; handed a bound, listening
    socket (master_listen_fd) it serves on that one and owns it from then on."""

    def __init__(self, world_size: int, timeout_s: float):
        from torch.distributed import TCPStore

        sock = socket.create_server((LOOPBACK, 0))
        self.port = sock.getsockname()[1]
        self.store = TCPStore(LOOPBACK, self.port, world_size, True,
                              timeout=timedelta(seconds=timeout_s), wait_for_workers=False,
                              master_listen_fd=sock.detach())

    def close(self) -> None:
        self.store = None       # the last reference: the server stops and its port closes


def exit_reason(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exited with code {rc}"


class WorkerGroup:
    """The processes of one attempt; each worker in its own session, so tearing the group
    down also reaches anything a worker started."""

    def __init__(self, attempt: int, procs: list[subprocess.Popen], rendezvous: Rendezvous):
        self.attempt, self.procs, self.rendezvous = attempt, procs, rendezvous

    def failures(self) -> dict[int, str]:
        """rank -> why it ended, for every worker that ended badly so far."""
        return {rank: f"rank {rank} (pid {p.pid}) {exit_reason(p.returncode)}"
                for rank, p in enumerate(self.procs)
                if p.poll() is not None and p.returncode != 0}

    def finished(self) -> bool:
        return all(p.poll() == 0 for p in self.procs)

    def teardown(self, grace_s: float = TERM_GRACE_S) -> None:
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            for p in self.procs:
                try:
                    os.killpg(p.pid, sig)   # the worker's session: it and its children
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + wait_s
            for p in self.procs:
                try:
                    p.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            if all(p.poll() is not None for p in self.procs):
                break
        self.rendezvous.close()


class TorchrunLauncher:
    """start() runs the supervisor in a thread; poll() returns the exit code when done."""

    def __init__(self, run: RunConfig, spec_path: str, log_path: str,
                 controller_events_path: str | None = None):
        self.run, self.spec_path, self.log_path = run, spec_path, log_path
        self.controller_events_path = controller_events_path or os.path.join(
            os.path.dirname(spec_path), "controller.jsonl")
        self.spec = None    # the JobSpec written to spec_path, set by the driver before start()
        self.error: str | None = None
        self._rc: int | None = None
        self._log = None
        self._group: WorkerGroup | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    connect_phase = None     # nothing to connect to: the workers start on this machine

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

    # ------------------------------------------------------------ the worker group

    def _worker_env(self, rank: int, world: int, attempt: int, port: int) -> dict[str, str]:
        c = self.run.schema.cluster
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
        env.setdefault("OMP_NUM_THREADS", str(max(1, int(c.cpus_per_worker))))
        env.update(collective_env(env))
        env.update({
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world), "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1",
            "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(world), "ROLE_NAME": "default",
            "MASTER_ADDR": LOOPBACK, "MASTER_PORT": str(port),
            "TORCHELASTIC_USE_AGENT_STORE": "True",          # the store above, not rank 0's
            "TORCHELASTIC_RESTART_COUNT": str(attempt),
            "TORCHELASTIC_MAX_RESTARTS": str(c.max_failures),
            "TORCHELASTIC_RUN_ID": f"{os.path.basename(os.path.dirname(self.spec_path))}-{attempt}",
        })
        return env

    def _start_group(self, attempt: int) -> WorkerGroup | None:
        world = nproc_of(self.run)
        with self._lock:
            if self._stopping.is_set():
                return None
            rendezvous = Rendezvous(world, self.run.schema.cluster.collective_timeout_s)
            procs = [subprocess.Popen(worker_command(self.spec_path),
                                      env=self._worker_env(rank, world, attempt, rendezvous.port),
                                      stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
                     for rank in range(world)]
            self._group = WorkerGroup(attempt, procs, rendezvous)
            return self._group

    def _wait(self, group: WorkerGroup) -> dict[int, str] | None:
        """{} when every worker finished, the failed ranks, or None when stopped."""
        while not self._stopping.wait(WATCH_INTERVAL_S):
            failed = group.failures()
            if failed:
                return failed
            if group.finished():
                return {}
        return None

    def _supervise(self) -> None:
        max_failures = self.run.schema.cluster.max_failures
        failures = 0
        try:
            while True:
                group = self._start_group(attempt=failures)
                outcome = None if group is None else self._wait(group)
                if outcome is None:          # stop() tears the group down; the driver reports it
                    return
                with self._lock:
                    group.teardown(grace_s=self._survivor_grace(group))
                if not outcome:
                    self._rc = 0
                    return
                failures += 1
                self._record_failure(failures, outcome)
                if failures > max_failures:
                    self.error = (f"the worker group failed {failures} times "
                                  f"(cluster.max_failures={max_failures}); last: "
                                  f"{next(iter(outcome.values()))}; last log lines:\n{self._tail()}")
                    self._rc = 1
                    return
        except BaseException as err:  # noqa: BLE001 - reported by the driver
            self.error = self.error or f"{type(err).__name__}: {err}"
            self._rc = 1

    def _survivor_grace(self, group: WorkerGroup) -> float:
        """A preempted worker saved with its peers and exits first: the others may still be
        committing that checkpoint, so they get the preemption grace, not the short one."""
        preempted = any(p.poll() == EXIT_PREEMPTED for p in group.procs)
        return self.run.schema.checkpoint.preempt_grace_s if preempted else TERM_GRACE_S

    def _record_failure(self, failures: int, errors: dict[int, str]) -> None:
        first = next(iter(errors.values()))
        EventWriter(self.controller_events_path).write(
            "failure", failures=failures, errors={str(r): e for r, e in errors.items()}, error=first)

    def start(self) -> None:
        self._log = open(self.log_path, "ab")
        self._thread = threading.Thread(target=self._supervise, daemon=True,
                                        name="torchrun-supervisor")
        self._thread.start()

    def poll(self) -> int | None:
        if self._thread is not None and self._thread.is_alive():
            return None
        return self._rc

    def _tail(self, lines: int = 25) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as handle:
                return "".join(handle.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout_s: float | None = None) -> None:
        """SIGTERM to every worker, which saves the step in progress and exits
        (workers/preemption.py); SIGKILL after timeout_s (default checkpoint.preempt_grace_s)."""
        if timeout_s is None:
            timeout_s = self.run.schema.checkpoint.preempt_grace_s
        self._stopping.set()
        with self._lock:    # a group being spawned right now is stored first, then torn down
            group = self._group
        if group is not None:
            group.teardown(grace_s=timeout_s)
        if self._thread is not None:
            self._thread.join(timeout_s)

    def close(self) -> None:
        self.stop()
        if self._log is not None:
            self._log.close()
            self._log = None
