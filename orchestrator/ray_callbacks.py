"""Ray Train callbacks run by the Ray Train controller (kept apart from ray_launcher.py so
that importing the launcher for the preflight does not import Ray Train).

Both append to the controller's event file (`controller.jsonl`), which the driver reads
before the workers' file, so a failure or a resize is seen before the next group's steps.
"""
from __future__ import annotations

import time

from ray.train.v2._internal.execution.callback import WorkerGroupCallback

from workers.events import EventWriter

from .errors import describe_error

try:   # Ray Train V2's controller hooks: a DeveloperAPI (RayTrainCallback), not UserCallback's
    from ray.train.v2._internal.execution.callback import ControllerCallback
    from ray.train.v2._internal.execution.controller.state import (ReschedulingState, ResizingState,
                                                                  RestartingState, SchedulingState)
except ImportError:  # moved in another Ray: resizes then show as plain restarts
    ControllerCallback = None

REFRESH_EVERY_S = 1.0


class FailureRelay(WorkerGroupCallback):
    """Runs in the Ray Train controller (pinned to the driver's node): appends a
    "group_start" event for every worker group Ray Train starts and one "failure" event per
    failed group, before Ray Train restarts it. Step events do not pass through here: rank 0
    writes them itself (workers/reporters.py).

    A WorkerGroupCallback (Ray's DeveloperAPI, the hooks that its UserCallbackHandler
    forwards as `after_exception`): it also sees group starts, so a failure is counted once
    per group, however many polls still show it (a preemption grace period) and however
    alike two groups' failures are."""

    def __init__(self, events_path: str):
        self.events_path = events_path
        self.groups = 0
        self.failures = 0
        self._failed_group = 0

    def after_worker_group_start(self, worker_group) -> None:
        self.groups += 1
        EventWriter(self.events_path).write("group_start", group=self.groups,
                                            world_size=len(worker_group.get_workers()))

    def after_worker_group_poll_status(self, worker_group_status) -> None:
        errors = worker_group_status.errors
        if not errors or self._failed_group == self.groups:
            return
        self._failed_group = self.groups
        self.failures += 1
        texts = {str(rank): describe_error(err)[:500] for rank, err in errors.items()}
        first = next(iter(texts.values()), "?").splitlines()[0][:200]
        EventWriter(self.events_path).write("failure", failures=self.failures, group=self.groups,
                                            errors=texts, error=first)


class _NoHooks:
    """Stands in for ControllerCallback when this Ray has no such hooks."""


class ElasticRelay(ControllerCallback or _NoHooks):
    """For elastic runs: appends the controller's sizing decisions, "schedule" (a group of
    N workers is about to be placed: the first, after a failure, or after a resize) and
    "resize" (a healthy group is torn down because the cluster now fits another size, Ray
    Train's elastic monitor; the grow's recovery_s starts here).

    It also keeps Ray Train's view of the cluster fresh. In Ray 2.60 the elastic policy
    counts the workers that fit from Ray Data's AutoscalingCoordinator, which re-reads the
    nodes only on its 20 s tick (TICK_INTERVAL_S). A lost node then still counts for up to
    20 s: the group is retried at the old size until the placement times out, and a new
    node is seen up to 20 s late. Before each decision this asks the coordinator for a
    recomputed reservation (fire and forget; the policy's own call, queued behind it from
    the same process, sees the result)."""

    def __init__(self, events_path: str):
        self.events_path = events_path
        self.workers: int | None = None     # the size of the group placed last
        self._last_refresh = float("-inf")
        self._coordinator = None

    def after_controller_state_update(self, previous_state, current_state) -> None:
        if isinstance(current_state, SchedulingState):
            self.workers = current_state.scaling_decision.num_workers
            EventWriter(self.events_path).write("schedule", workers=self.workers)
        elif isinstance(current_state, ResizingState):
            EventWriter(self.events_path).write(
                "resize", workers=current_state.scaling_decision.num_workers,
                previous_workers=self.workers)
        deciding = isinstance(current_state, (RestartingState, ReschedulingState))
        if deciding or time.monotonic() - self._last_refresh >= REFRESH_EVERY_S:
            self._refresh_cluster_view()

    def _refresh_cluster_view(self) -> None:
        self._last_refresh = time.monotonic()
        try:
            if self._coordinator is None:
                from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
                    get_or_create_autoscaling_coordinator)
                self._coordinator = get_or_create_autoscaling_coordinator()
            self._coordinator.get_reserved_resources.remote("foldmoe-refresh", recompute=True)
        except Exception:  # noqa: BLE001 - private API moved: Ray's own 20 s tick remains
            self._coordinator = None


class PreemptionHandlers(WorkerGroupCallback):
    """Installs the preemption SIGTERM handler in every worker of a new group, as a task on
    the worker actor, which runs on the process's main thread (workers/preemption.py: the
    training function runs in another thread, where Python cannot install handlers)."""

    def __init__(self, grace_s: float, timeout_s: float = 60.0):
        self.grace_s, self.timeout_s = grace_s, timeout_s

    def after_worker_group_start(self, worker_group) -> None:
        import ray

        from workers.preemption import catch_sigterm_for_worker_threads

        workers = worker_group.get_workers()
        refs = [w.execute_async(catch_sigterm_for_worker_threads, rank, self.grace_s)
                for rank, w in enumerate(workers)]
        try:
            installed = ray.get(refs, timeout=self.timeout_s)
        except Exception as err:  # noqa: BLE001 - a worker that cannot save still trains
            print(f"warning: preemption handlers not installed ({type(err).__name__}: {err}); "
                  "a SIGTERMed worker resumes from the newest periodic checkpoint", flush=True)
            return
        if not all(installed):
            print("warning: a Ray Train worker ran its tasks off the main thread; SIGTERM there "
                  "resumes from the newest periodic checkpoint", flush=True)


def controller_callbacks(events_path: str, elastic: bool, preempt_grace_s: float = 25.0) -> list:
    """The callbacks the launcher passes to RunConfig(callbacks=...)."""
    relays: list = [FailureRelay(events_path), PreemptionHandlers(preempt_grace_s)]
    if elastic and ControllerCallback is not None:
        relays.append(ElasticRelay(events_path))
    return relays
