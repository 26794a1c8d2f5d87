"""Ray Train callbacks run by the Ray Train controller (kept apart from ray_launcher.py so
that importing the launcher for the preflight does not import Ray Train)."""
from __future__ import annotations

from ray.train.v2._internal.execution.callback import WorkerGroupCallback

from workers.events import EventWriter


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
        texts = {str(rank): f"{type(err).__name__}: {err}"[:500] for rank, err in errors.items()}
        first = next(iter(texts.values()), "?").splitlines()[0][:200]
        EventWriter(self.events_path).write("failure", failures=self.failures, group=self.groups,
                                            errors=texts, error=first)
