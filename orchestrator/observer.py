"""Turns the job's events into MLflow records, the progress display and --metrics-jsonl.

Runs in the driver only, so exactly one process writes to MLflow whatever the number of
workers or restarts.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from .progress import ProgressDisplay
from .tracking import Tracker


def layout_text(world_size: int, layout: dict, groups: dict[str, list[list[int]]]) -> str:
    c = layout
    dp = world_size // (c["tp"] * c["cp"] * c["pp"])
    edp = world_size // (c["etp"] * c["ep"] * c["pp"])
    lines = [f"world size {world_size}: attention tp={c['tp']} cp={c['cp']} dp={dp} pp={c['pp']}; "
             f"MoE etp={c['etp']} ep={c['ep']} edp={edp} pp={c['pp']}"]
    width = max(len(axis) for axis in groups)
    for axis, rank_lists in groups.items():
        lines.append(f"  {axis:<{width}}  " + " ".join(str(g) for g in rank_lists))
    return "\n".join(lines) + "\n"


@dataclass
class JobStats:
    driver_start: float
    first_step_at: float | None = None     # wall clock of the first completed step
    last_record: dict | None = None
    restarts: int = 0
    steps_seen: int = 0
    failures: list[dict] = field(default_factory=list)


class JobObserver:
    def __init__(self, *, total_steps: int, tracker: Tracker | None, progress: ProgressDisplay,
                 metrics_jsonl: str | None, layout_groups, driver_start: float,
                 auto_choice=None):
        self.total_steps = total_steps
        self.tracker = tracker
        self.progress = progress
        self.layout_groups = layout_groups     # world_size -> {axis: rank lists}
        self.auto_choice = auto_choice         # world_size -> planner row (parallel.auto), or None
        self._starts = 0
        self.stats = JobStats(driver_start=driver_start)
        self._jsonl = open(metrics_jsonl, "a", encoding="utf-8") if metrics_jsonl else None
        self._started_once = False

    def handle(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "start":
            self._on_start(event)
        elif kind == "step":
            self._on_step(event)
        elif kind == "failure":
            self.stats.failures.append(event)
            self.progress.note(f"worker group failed ({event.get('error', '?')}); "
                               "restarting from the latest checkpoint")

    def _on_start(self, event: dict) -> None:
        resumed = event.get("resumed_from_step")
        where = f"resuming at step {resumed}" if resumed is not None else "starting at step 0"
        self.progress.note(f"worker group up: world size {event['world_size']}, {where}; "
                           f"peak {event['peak_flops'] / 1e12:.3g} TFLOP/s/device "
                           f"({event['peak_flops_source']})")
        self._note_auto_choice(event["world_size"])
        if self._started_once or self.tracker is None:
            self._started_once = True
            return
        self._started_once = True
        layout, world = event["layout"], event["world_size"]
        groups = self.layout_groups(world)
        params = {f"layout.{k}": v for k, v in layout.items()}
        params.update({"layout.dp": world // (layout["tp"] * layout["cp"] * layout["pp"]),
                       "layout.edp": world // (layout["etp"] * layout["ep"] * layout["pp"]),
                       "params.total": event["params"]["total"],
                       "params.active": event["params"]["active"],
                       "peak_flops_per_device": event["peak_flops"],
                       "peak_flops_source": event["peak_flops_source"],
                       "device": event.get("device", "")})
        self.tracker.log_params(params)
        self.tracker.log_text(layout_text(world, layout, groups), "layout.txt")
        self.tracker.log_text(json.dumps({"world_size": world, "layout": layout, "groups": groups},
                                         indent=1), "layout.json")

    def _note_auto_choice(self, world: int) -> None:
        """parallel.auto: the planner's layout for this (possibly new) world size, printed
        and logged at every start of the worker group (elastic restarts included)."""
        if self.auto_choice is None:
            return
        row = self.auto_choice(world)
        d = row.degrees()
        self.progress.note(
            f"parallel.auto: world size {world} -> tp={d['tp']} cp={d['cp']} pp={d['pp']} vpp={d['vpp']} "
            f"ep={d['ep']} etp={d['etp']} (dp={d['dp']} edp={d['edp']}); predicted "
            f"{row.step_time_s:.3g} s/step, MFU {row.mfu:.1%}")
        if self.tracker is not None:
            self.tracker.log_metric("auto_predicted_mfu", row.mfu, step=self._starts)
            self.tracker.log_metric("auto_predicted_step_time_s", row.step_time_s, step=self._starts)
            self.tracker.log_text(json.dumps({"world_size": world, **row.as_dict()}, indent=1),
                                  f"auto_layout_start{self._starts}_world{world}.json")
        self._starts += 1

    def _on_step(self, event: dict) -> None:
        record = {k: v for k, v in event.items() if k != "type"}
        self.stats.steps_seen += 1
        if self.stats.first_step_at is None:
            self.stats.first_step_at = record["time"]
        self.stats.restarts = max(self.stats.restarts, int(record.get("restarts", 0)))
        self.stats.last_record = record
        if self.tracker is not None:
            self.tracker.log_step(record["step"], record, record["time"])
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        self.progress.update(record)

    @property
    def finished_all_steps(self) -> bool:
        last = self.stats.last_record
        return last is not None and last["step"] + 1 >= self.total_steps

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def summary(self, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        s = self.stats
        return {"job_time_s": now - s.driver_start,
                "time_to_first_step_s": (s.first_step_at - s.driver_start) if s.first_step_at else None,
                "restarts": s.restarts, "steps_seen": s.steps_seen,
                "final_loss": s.last_record.get("loss") if s.last_record else None}
