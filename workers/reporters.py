"""How worker events reach the driver: rank 0 appends them to the job's event file.

The same channel under both launchers: immediate (a step is visible to the driver as soon
as rank 0 finished it), never throttled by the launcher, and durable across worker-group
restarts. The job dir must be visible to the driver, which Ray Train V2 already requires
of its storage_path on multi-node clusters (shared filesystem).
"""
from __future__ import annotations

import os

from workers.events import EventTail, EventWriter


def previous_starts(events_path: str) -> int:
    """Worker groups of this job that came up before this one (their rank 0 wrote "placed",
    also those that then failed to load a checkpoint)."""
    return sum(1 for e in EventTail(events_path).read() if e.get("type") == "placed")


class FileReporter:
    """Rank 0 writes "placed" (on creation), "start" and "step" events; other ranks stay silent.

    restarts: worker groups started before this one in the same job (torchrun also sets
    TORCHELASTIC_RESTART_COUNT, which counts groups that died before reporting)."""

    def __init__(self, events_path: str, rank: int):
        self.writer = EventWriter(events_path) if rank == 0 else None
        self.restarts = 0
        if rank == 0:
            self.restarts = max(previous_starts(events_path),
                                int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
            # The process group is up: the launcher has placed this worker group.
            self.writer.write("placed", restarts=self.restarts)

    def start(self, info: dict) -> None:
        if self.writer:
            self.writer.write("start", restarts=self.restarts, **info)

    def step(self, record: dict) -> None:
        if self.writer:
            self.writer.write("step", restarts=self.restarts, **record)

    def event(self, event_type: str, **fields) -> None:
        """Any other event of this group (a checkpoint fallback, a fatal refusal)."""
        if self.writer:
            self.writer.write(event_type, restarts=self.restarts, **fields)


class RayReporter(FileReporter):
    """Also reports to Ray Train at checkpoint steps and the last step, so the Ray
    dashboard and `Result.metrics` show progress. Not every step: a report is a barrier
    that waits for the controller's next poll (~2 s), which would throttle short steps.
    The decision depends only on the step, so every rank reports the same number of times."""

    def __init__(self, events_path: str, rank: int, total_steps: int):
        super().__init__(events_path, rank)
        self.total_steps = total_steps

    def step(self, record: dict) -> None:
        super().step(record)
        if record.get("checkpointed") or record["step"] + 1 == self.total_steps:
            import ray.train

            ray.train.report({k: v for k, v in record.items() if isinstance(v, (int, float))})
