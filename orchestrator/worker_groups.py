"""The history of a job's worker groups, as the driver sees it in the event files: every
(re)start with its cause, world size, layout, the step it resumed from, and `recovery_s`.

recovery_s runs from the interruption to the first step the new group completes. The
interruption is the controller's own record of it when there is one: the "failure" event
(`UserCallback.after_exception`: a worker or its node died) or the "resize" event (Ray
Train's elastic monitor tears a healthy group down to restart it at another size,
orchestrator/ray_callbacks.py). Without either (torchrun, or a Ray without the hooks) it
is the last step completed before the new group came up.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class WorkerGroup:
    index: int                      # 0 = the job's first group
    cause: str                      # "start", "failure", "resize" or "restart" (cause unknown)
    world_size: int
    layout: dict
    resumed_from_step: int | None
    started_at: float               # the group's "start" event: model built, checkpoint loaded
    interrupted_at: float | None    # failure / resize / last step before; None for the first
    first_step_at: float | None = None
    recovery_s: float | None = None
    resized: tuple[int, int] | None = None     # (from, to) workers, for a resize

    def as_dict(self) -> dict:
        return asdict(self)


def degrees_text(world_size: int, layout: dict) -> str:
    """`tp2 cp1 pp1 ep4 etp1 (dp2 edp1)`: the layout of a group in one phrase."""
    c = layout
    dp = world_size // (c["tp"] * c["cp"] * c["pp"])
    edp = world_size // (c["etp"] * c["ep"] * c["pp"])
    vpp = f" vpp{c['vpp']}" if c.get("vpp", 1) > 1 else ""
    return (f"tp{c['tp']} cp{c['cp']} pp{c['pp']}{vpp} ep{c['ep']} etp{c['etp']} "
            f"(dp{dp} edp{edp})")


@dataclass
class WorkerGroupHistory:
    groups: list[WorkerGroup] = field(default_factory=list)
    _cause: str | None = None
    _since: float | None = None
    _resized: tuple[int, int] | None = None
    _last_step_at: float | None = None

    def failure(self, event: dict) -> None:
        if self._cause is None:          # the first sign of this interruption
            self._cause, self._since = "failure", event["time"]

    def resize(self, event: dict) -> None:
        if self._cause is None:
            self._cause, self._since = "resize", event["time"]
            self._resized = (event.get("previous_workers"), event.get("workers"))

    def start(self, event: dict) -> WorkerGroup:
        first = not self.groups
        group = WorkerGroup(
            index=len(self.groups), cause="start" if first else (self._cause or "restart"),
            world_size=event["world_size"], layout=event.get("layout", {}),
            resumed_from_step=event.get("resumed_from_step"), started_at=event["time"],
            interrupted_at=None if first else (self._since if self._since is not None
                                               else self._last_step_at),
            resized=self._resized)
        self.groups.append(group)
        self._cause = self._since = self._resized = None
        return group

    def step(self, record: dict) -> WorkerGroup | None:
        """Returns the current group when `record` is its first step (recovery_s set)."""
        self._last_step_at = record["time"]
        group = self.groups[-1] if self.groups else None
        if group is None or group.first_step_at is not None or record["time"] < group.started_at:
            return None       # not the first step of a group (or a step of the previous one)
        group.first_step_at = record["time"]
        if group.interrupted_at is not None:
            group.recovery_s = group.first_step_at - group.interrupted_at
        return group

    def recovery_s(self) -> list[float]:
        return [g.recovery_s for g in self.groups if g.recovery_s is not None]

    @staticmethod
    def resize_text(group: WorkerGroup) -> str:
        if group.resized is None or None in group.resized:
            return "resized"
        return f"resized {group.resized[0]} -> {group.resized[1]} workers"

    def describe_start(self, group: WorkerGroup, with_cause: bool = True) -> str:
        why = {"failure": "after a failure", "restart": "restarted", "resize": self.resize_text(group)}
        where = (f"resumed at step {group.resumed_from_step}" if group.resumed_from_step is not None
                 else "starting at step 0")
        head = ("" if group.cause == "start" or not with_cause
                else f"group {group.index} ({why[group.cause]}): ")
        layout = f", {degrees_text(group.world_size, group.layout)}" if group.layout else ""
        return f"{head}world size {group.world_size}{layout}, {where}"
