"""Preemption without lost work: a SIGTERM to any one rank makes every rank finish the step
in progress, save a checkpoint at it, and exit with EXIT_PREEMPTED.

The signal usually reaches one process only (a preempted node, an evicted pod). Each rank
sets a local flag; the flag rides in the step's metric vector (Trainer.train_step's
`stop_requested`: one more element of the SUM over the stage that already runs, gathered
over pp with the rest), so every rank learns of it at the same step with no extra collective,
and they all save that step. The driver asks for the same thing by writing REQUEST_FILE in
the job dir (a SIGTERM to the driver, `ray job stop`); rank 0 looks for it at most every
0.2 s, one stat() call.

`preempt_grace_s` bounds the whole thing: a watchdog started by the signal ends the process
with EXIT_PREEMPTED when it runs out (a peer that died makes the save's collectives wait);
a save cut short by it leaves the previous complete checkpoint the newest one.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

EXIT_PREEMPTED = 128 + signal.SIGTERM   # what a shell reports for "terminated by SIGTERM"
REQUEST_FILE = "preempt.request"
STOP_SAVE_KEY = "stop_save"     # in a checkpoint's meta: the save a stop or preemption asked for
_REQUEST_POLL_S = 0.2


class Preempted(RuntimeError):
    """Raised by the worker loop after the preemption checkpoint is saved: the launcher
    restarts the group (torchrun --max-restarts, Ray Train's FailureConfig), which resumes
    at that checkpoint; or the job stops, when the driver asked."""

    def __init__(self, step: int, path: str):
        super().__init__(f"preempted: saved step {step} to {path} and stopped")
        self.step, self.path = step, path


def request_path(job_dir: str) -> str:
    return os.path.join(job_dir, REQUEST_FILE)


def write_request(job_dir: str, reason: str) -> None:
    """The driver's way to ask every worker group of the job to save and stop."""
    tmp = f"{request_path(job_dir)}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(f"{time.time():.3f} {reason}\n")
    os.replace(tmp, request_path(job_dir))


# SIGTERM caught on the main thread for a loop that runs in another thread: signals are
# process-wide, and Python runs handlers on the main thread only.
_process_sigterm_at: list[float] = []


def catch_sigterm_for_worker_threads(rank: int, grace_s: float) -> bool:
    """Replaces Ray's exit-on-SIGTERM in a Ray Train worker with a flag that the training
    thread's PreemptionWatch reads, plus the grace watchdog.

    Run as a task on the worker actor (orchestrator/ray_callbacks.py): Ray Train V2's
    worker actor runs its tasks on the process's main thread (max_concurrency=1) and the
    training function in a thread of its own, so this is the one place where the handler
    can be installed. Ray's core worker checks for signals while it waits for tasks, so the
    handler runs while training goes on in the other thread."""
    if threading.current_thread() is not threading.main_thread():
        return False

    def on_sigterm(_signum, _frame) -> None:
        if _process_sigterm_at:
            return
        _process_sigterm_at.append(time.monotonic())
        print(f"rank {rank}: SIGTERM: finishing the step, saving, exiting within {grace_s:g}s",
              file=sys.stderr, flush=True)
        watchdog = threading.Timer(grace_s, _exit_after_grace, args=(rank, grace_s))
        watchdog.daemon = True
        watchdog.start()

    signal.signal(signal.SIGTERM, on_sigterm)
    return True


def _exit_after_grace(rank: int, grace_s: float) -> None:
    print(f"rank {rank}: {grace_s:g}s after SIGTERM: exiting", file=sys.stderr, flush=True)
    os._exit(EXIT_PREEMPTED)


class PreemptionWatch:
    """This rank's stop request: a SIGTERM it received, or (rank 0) the driver's request file.

    The signal handler can only be installed from the main thread (Python's rule): torchrun
    workers run the loop there. Under Ray Train V2 the loop runs in a thread; the handler is
    installed on the actor's main thread by catch_sigterm_for_worker_threads, and this
    watch reads its flag. The driver's request file works under both."""

    def __init__(self, job_dir: str, rank: int, grace_s: float):
        self.job_dir, self.rank, self.grace_s = job_dir, rank, grace_s
        self.signaled_at: float | None = None
        self._next_poll = 0.0
        self._previous = None
        self._watchdog: threading.Timer | None = None
        self.installed = False

    def install(self) -> "PreemptionWatch":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self.installed = True
        return self

    def restore(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.installed:
            signal.signal(signal.SIGTERM, self._previous)
            self.installed = False

    def _on_sigterm(self, _signum, _frame) -> None:
        if self.signaled_at is not None:
            return
        self.signaled_at = time.monotonic()
        print(f"rank {self.rank}: SIGTERM: finishing the step, saving, exiting within "
              f"{self.grace_s:g}s", file=sys.stderr, flush=True)
        self._watchdog = threading.Timer(self.grace_s, self._out_of_grace)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _out_of_grace(self) -> None:
        print(f"rank {self.rank}: preemption save did not finish within {self.grace_s:g}s; "
              "exiting (the previous complete checkpoint stays the newest)",
              file=sys.stderr, flush=True)
        os._exit(EXIT_PREEMPTED)

    def requested(self) -> bool:
        """This rank's vote for the current step (read when the step's metrics are reduced)."""
        if self.signaled_at is not None or _process_sigterm_at:
            return True
        if self.rank != 0 or time.monotonic() < self._next_poll:
            return False
        self._next_poll = time.monotonic() + _REQUEST_POLL_S
        return os.path.exists(request_path(self.job_dir))
