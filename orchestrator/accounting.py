"""Restart accounting in the driver: every worker-group start, failure, resume and checkpoint
fallback of a job, counted from the job's events (workers/events.py).

A group start is seen from two sides: the Ray Train controller writes "group_start" for
every group Ray starts (also one that dies before its rank 0 runs a line of foldmoe), and
rank 0 of every group writes "placed" once its process group is up (the only source under
torchrun). The number of group starts is the larger of the two counts, and restarts =
group starts - 1, whatever the failures said: two identical failures are two restarts.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

FIRST_START = "first start"


@dataclass
class GroupRecord:
    group: int                              # 1 for the first worker group of the job
    started_at: float
    cause: str                              # FIRST_START, or the failure that led to it
    world_size: int | None = None
    resumed_from_step: int | None = None    # None: a fresh start (or not up yet)
    up_at: float | None = None              # the "start" event: checkpoint loaded
    fallbacks: list[str] = field(default_factory=list)


@dataclass
class Accounting:
    controller_groups: int = 0
    placed: int = 0
    groups: list[GroupRecord] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    fatal: str | None = None                # a refusal no restart can fix (workers' "fatal")
    _pending_cause: str | None = None

    @property
    def group_starts(self) -> int:
        return max(self.controller_groups, self.placed)

    @property
    def restarts(self) -> int:
        return max(self.group_starts - 1, 0)

    @property
    def fallbacks(self) -> list[str]:
        return [message for group in self.groups for message in group.fallbacks]

    def _open_groups(self, now: float) -> None:
        while len(self.groups) < self.group_starts:
            if not self.groups:
                cause = FIRST_START
            else:
                cause = self._pending_cause or "restarted by the launcher, no failure reported"
            self._pending_cause = None
            self.groups.append(GroupRecord(group=len(self.groups) + 1, started_at=now, cause=cause))

    def on_group_start(self, event: dict) -> None:
        self.controller_groups = max(self.controller_groups,
                                     int(event.get("group", self.controller_groups + 1)))
        self._open_groups(event.get("time", time.time()))

    def on_placed(self, event: dict) -> None:
        self.placed += 1
        self._open_groups(event.get("time", time.time()))

    def on_failure(self, event: dict) -> None:
        self.failures.append({k: v for k, v in event.items() if k != "type"})
        self._pending_cause = self.failure_cause

    @property
    def failure_cause(self) -> str:
        """The newest failure in words: a preempted group's (every rank saved a step, then
        exited) names the step, not only what Ray saw."""
        event = self.failures[-1]
        saved = event.get("preempted_step")
        if saved is None:
            return f"failure {len(self.failures)}: {event.get('error', '?')}"
        return (f"failure {len(self.failures)}: preempted, a worker got SIGTERM and every rank "
                f"saved step {saved}; the launcher saw {event.get('error', '?')}")

    def current(self) -> GroupRecord:
        if not self.groups:     # an event before any "placed" (a worker of an older version)
            self.placed = 1
            self._open_groups(time.time())
        return self.groups[-1]

    def on_start(self, event: dict) -> GroupRecord:
        record = self.current()
        if record.up_at is not None:    # a second start without "placed": another group
            self.placed = max(self.placed, len(self.groups)) + 1
            self._open_groups(event.get("time", time.time()))
            record = self.groups[-1]
        record.world_size = event.get("world_size")
        record.resumed_from_step = event.get("resumed_from_step")
        record.up_at = event.get("time")
        return record

    def on_fallback(self, event: dict) -> None:
        self.current().fallbacks.append(event.get("message", "?"))

    def on_fatal(self, event: dict) -> None:
        self.fatal = self.fatal or event.get("error", "a worker refused to go on")

    def as_dict(self) -> dict:
        return {"group_starts": self.group_starts, "restarts": self.restarts,
                "failures": self.failures, "groups": [asdict(g) for g in self.groups],
                "fatal": self.fatal}
