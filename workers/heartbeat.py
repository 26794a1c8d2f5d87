"""Each rank's heartbeat: where it is (step, phase, the mesh axes that phase communicates
over) and how long its recent steps took, in one small JSON file per rank that the
driver's watchdog reads (orchestrator/watchdog.py).

Two clocks, so the driver can tell a frozen rank from one that waits for a peer:
- progress: the training thread calls `phase()` at every phase change. That is a few
  attribute stores and one time.time(): no I/O, no device synchronisation on the hot path.
- liveness: a daemon thread rewrites the file every BEAT_INTERVAL_S (atomic replace). A
  rank blocked in a collective keeps beating (torch releases the GIL while it waits); a
  SIGSTOPped, dead or wedged process stops beating.

Why files: the same channel as the job's event log and the pid files (JOB_DIR/workers/),
identical under Ray Train and torchrun, needs no Ray actor or object store (a wedged
raylet would otherwise look like every rank hanging), survives group restarts, and has one
writer per file. Multi-node jobs already need the job dir on a shared filesystem.

Step time for straggler detection is the training thread's *busy* time: time on a CPU plus
time runnable but waiting for one (Linux schedstat), so CPU contention and slow cores count
and time blocked in a collective waiting for a slower peer does not (in synchronous
training every rank's wall time per step is the slowest rank's). On CUDA this is host time.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections import deque

BEAT_INTERVAL_S = 1.0
RECENT_STEPS = 8              # step times carried by each beat (the driver may miss beats)
_SCHEDSTAT = "/proc/thread-self/schedstat"


def heartbeat_path(job_dir: str, rank: int) -> str:
    return os.path.join(job_dir, "workers", f"rank{rank}.heartbeat.json")


def ray_node_id() -> str | None:
    """This process's Ray node when it runs in Ray (a Ray Train worker, a driver connected
    to a cluster), else None; never imports Ray."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:    # a runtime context of an older Ray, or none yet
        return None


def group_token() -> str:
    """The same for every rank of one worker group, new for the next group: its rendezvous
    (Ray Train and torchrun set MASTER_ADDR/PORT; torchrun also counts its restarts)."""
    env = os.environ
    return ":".join(env.get(k, "") for k in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                                               "TORCHELASTIC_RESTART_COUNT"))


def busy_seconds() -> float:
    """The calling thread's time on a CPU plus waiting in the run queue (Linux), else its
    CPU time. Sleeping (a blocked collective, I/O) counts in neither."""
    try:
        with open(_SCHEDSTAT, encoding="ascii") as handle:
            on_cpu_ns, run_queue_ns = handle.read().split()[:2]
        return (int(on_cpu_ns) + int(run_queue_ns)) / 1e9
    except (OSError, ValueError):
        return time.thread_time()


class Heartbeat:
    """One rank's heartbeat; `phase`/`begin_step`/`end_step` are called by the training thread."""

    def __init__(self, job_dir: str, rank: int, world_size: int, *,
                 interval_s: float = BEAT_INTERVAL_S):
        self.path = heartbeat_path(job_dir, rank)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.interval_s = interval_s
        self._fixed = {"rank": rank, "world_size": world_size, "pid": os.getpid(),
                       "host": socket.gethostname(), "started": time.time(),
                       "group": group_token()}
        node = ray_node_id()
        if node is not None:      # lets a driver elsewhere signal it (orchestrator/watchdog.py)
            self._fixed["node_id"] = node
        self.step: int | None = None
        self.current: tuple[str, tuple[str, ...]] = ("setup", ())
        self.progress = 0                    # incremented by every phase change
        self.phase_since = time.time()
        self.step_times: deque = deque(maxlen=RECENT_STEPS)   # (step, wall_s, busy_s)
        self._step_start: tuple[float, float] | None = None
        self._beats = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="foldmoe-heartbeat")

    def start(self) -> "Heartbeat":
        self.write()
        self._thread.start()
        return self

    def phase(self, name: str, axes: tuple[str, ...] = ()) -> None:
        """Entering `name`; `axes` are the mesh axes its collectives use (may be empty)."""
        self.current = (name, tuple(axes))
        self.phase_since = time.time()
        self.progress += 1

    def begin_step(self, step: int) -> None:
        self.step = step
        self._step_start = (time.perf_counter(), busy_seconds())
        self.phase("step")

    def end_step(self, step: int) -> None:
        wall0, busy0 = self._step_start
        self.step_times.append((step, time.perf_counter() - wall0, busy_seconds() - busy0))
        self.phase("after step")

    def snapshot(self) -> dict:
        name, axes = self.current
        return {**self._fixed, "beat": self._beats, "time": time.time(), "step": self.step,
                "phase": name, "axes": list(axes), "progress": self.progress,
                "phase_since": self.phase_since, "step_times": [list(t) for t in self.step_times]}

    def write(self) -> None:
        self._beats += 1
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(self.snapshot(), handle)
        os.replace(tmp, self.path)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.write()
            except OSError:          # a full or vanished job dir must not kill training
                pass

    def close(self, final_phase: str = "exited") -> None:
        """Stops beating; the last beat says the rank left on purpose (not a hang)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2 * self.interval_s)
        self.phase(final_phase)
        try:
            self.write()
        except OSError:
            pass


def read_heartbeat(path: str) -> dict | None:
    """One rank's last beat, or None if missing or mid-replace."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None
