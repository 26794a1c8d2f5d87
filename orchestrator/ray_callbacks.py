"""Ray Train callbacks run by the Ray Train controller (kept apart from ray_launcher.py so
that importing the launcher for the preflight does not import Ray Train)."""
from __future__ import annotations

from ray.train import UserCallback

from workers.events import EventWriter


class FailureRelay(UserCallback):
    """Runs in the Ray Train controller (pinned to the driver's node): appends each
    worker-group failure to the controller's event file before Ray Train restarts the group.
    Step events do not pass through here: rank 0 writes them itself (workers/reporters.py)."""

    def __init__(self, events_path: str):
        self.events_path = events_path
        self.failures = 0
        self._seen: set[str] = set()

    def after_exception(self, run_context, worker_exceptions) -> None:
        errors = {str(rank): f"{type(err).__name__}: {err}"[:500]
                  for rank, err in worker_exceptions.items()}
        key = repr(sorted(errors.items()))
        if key in self._seen:   # called on every poll that still sees the same failure
            return
        self._seen.add(key)
        self.failures += 1
        first = next(iter(errors.values()), "?").splitlines()[0][:200]
        EventWriter(self.events_path).write("failure", failures=self.failures, errors=errors,
                                            error=first)
