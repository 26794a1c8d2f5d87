"""Turns the job's events into MLflow records, the progress display, Ray metrics and
--metrics-jsonl.

Runs in the driver only, so exactly one process writes to MLflow whatever the number of
workers or restarts. Event types: "placed" (rank 0 of a new worker group is up), "start"
(model built, checkpoint loaded), "step", "checkpoint_fallback" (a checkpoint failed
verification and was moved aside), "fatal" (a refusal no restart can fix: the driver ends
the job), the watchdog's "hang" and "straggler", and the controller's "group_start",
"failure", "schedule" and "resize" (elastic runs). Restarts are counted in
orchestrator/accounting.py; each group's world size, layout and recovery_s are kept in
orchestrator/worker_groups.py.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field

from .accounting import FIRST_START, Accounting
from .metric_names import FAULT_HANGS, FAULT_STRAGGLERS
from .progress import ProgressDisplay
from .tracking import Tracker
from .worker_groups import WorkerGroupHistory


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
    tokens: float = 0.0                    # tokens of every step trained (re-runs included)
    world_size: int | None = None
    resumed_from_step: int | None = None
    start_info: dict = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)
    faults: list[dict] = field(default_factory=list)          # the watchdog's hang/straggler events
    groups: WorkerGroupHistory = field(default_factory=WorkerGroupHistory)
    steady_tokens_per_s: list[float] = field(default_factory=list)
    steady_mfu: list[float] = field(default_factory=list)


class JobObserver:
    def __init__(self, *, total_steps: int, tracker: Tracker | None, progress: ProgressDisplay,
                 metrics_jsonl: str | None, layout_groups, driver_start: float,
                 plan=None, sinks=(), auto_choice=None):
        self.total_steps = total_steps
        self.tracker = tracker
        self.progress = progress
        self.layout_groups = layout_groups     # world_size -> {axis: rank lists}
        self.plan = plan                       # world_size -> (plan text, plan dict), or None
        self.sinks = list(sinks)               # objects with .step(record): Ray metrics
        self.auto_choice = auto_choice         # world_size -> planner row (parallel.auto), or None
        self._starts = 0
        self.stats = JobStats(driver_start=driver_start)
        self.accounting = Accounting()
        self._jsonl = open(metrics_jsonl, "a", encoding="utf-8") if metrics_jsonl else None
        self._started_once = False
        self._first_step_of_group = True
        self._accounting_logged = False
        self._preempted_save: int | None = None     # the step a preempted group saved

    def handle(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "placed":
            self.accounting.on_placed(event)
            self.progress.phase("build the model", started=event["time"])
        elif kind == "group_start":
            self.accounting.on_group_start(event)
        elif kind == "start":
            self._on_start(event)
        elif kind == "step":
            self._on_step(event)
        elif kind == "checkpoint_fallback":
            self.accounting.on_fallback(event)
            self.progress.warn(event.get("message", "a checkpoint failed verification"))
        elif kind == "fatal":
            self.accounting.on_fatal(event)
        elif kind in ("hang", "straggler"):
            self._on_fault(event)
        elif kind == "failure":
            if self._preempted_save is not None:
                # A preempted group saved its step before exiting: Ray sees the exit as a
                # failure (a failed health check), which would read like a crash.
                event = {**event, "preempted_step": self._preempted_save}
                self._preempted_save = None
            self.accounting.on_failure(event)
            self.stats.failures.append(event)
            self.stats.groups.failure(event)     # recovery_s: from the first failure of an outage
            self.progress.end_phase()
            what = "preempted" if "preempted_step" in event else "failed"
            self.progress.note(f"worker group {what} ({self.accounting.failure_cause}); restarting "
                               "from the newest checkpoint that verifies")
            self.progress.phase("restart: place workers", started=event.get("time"))

        elif kind == "resize":
            self.stats.groups.resize(event)
            self.progress.end_phase()
            self.progress.note(f"resizing the worker group: {event.get('previous_workers')} -> "
                               f"{event.get('workers')} workers fit the cluster now; restarting "
                               "from the latest checkpoint")
            self.progress.phase("resize: place workers", started=event["time"])
        elif kind == "schedule" and self._started_once:
            self.progress.phase(f"place {event['workers']} workers", started=event["time"])

    @property
    def fatal_error(self) -> str | None:
        """A worker's refusal that no restart can fix (the driver stops the job)."""
        return self.accounting.fatal

    def _on_fault(self, event: dict) -> None:
        """The watchdog's one line (orchestrator/watchdog.py), and its count in MLflow."""
        self.stats.faults.append(event)
        self.progress.warn(event["message"])
        if self.tracker is None:
            return
        step = event.get("step") or 0
        if event["type"] == "hang":
            self.tracker.log_metric(FAULT_HANGS, event["hangs"], step=step)
        else:
            self.tracker.log_metric(FAULT_STRAGGLERS, len(event["stragglers"]), step=step)
            reported = sorted({e["rank"] for e in self.stats.faults if e["type"] == "straggler"})
            self.tracker.set_tag("foldmoe.straggler_ranks", ",".join(map(str, reported)))

    def _on_start(self, event: dict) -> None:
        resumed = event.get("resumed_from_step")
        built, loaded = event.get("model_built_at"), event.get("checkpoint_loaded_at")
        if built is not None and loaded is not None:
            self.progress.phase("load the checkpoint", started=built)
            self.progress.end_phase(loaded, suffix=f" (step {resumed})" if resumed is not None
                                    else " (none: a fresh start)")
            self.progress.phase("look up the device peak", started=loaded)
        record = self.accounting.on_start(event)
        group = self.stats.groups.start(event)
        how = "" if record.cause == FIRST_START else f" (restart {record.group - 1}, after {record.cause})"
        if group.cause == "resize":
            how = f" (restart {record.group - 1}, {self.stats.groups.resize_text(group)})"
        hint = " (--no-resume starts over)" if resumed is not None and group.index == 0 else ""
        self.progress.end_phase(event["time"])
        if self.tracker is not None and self.accounting.restarts:
            # at once, also for a group that fails before its first step (steps carry it too)
            self.tracker.log_metric("cluster/restarts", self.accounting.restarts, step=resumed or 0)
        # Written only now: this event comes after the checkpoint was loaded on every rank.
        self.progress.note(f"worker group {record.group} up{how}: "
                           f"{self.stats.groups.describe_start(group, with_cause=False)}{hint}; "
                           f"peak {event['peak_flops'] / 1e12:.3g} TFLOP/s/device "
                           f"({event['peak_flops_source']})")
        self.progress.phase("first step", started=event["time"])
        self._first_step_of_group = True
        self._preempted_save = None      # a new group: an older group's save is not its cause
        self.stats.world_size = event["world_size"]
        self.stats.start_info = event
        if not self._started_once:
            self.stats.resumed_from_step = resumed
        self._note_auto_choice(event["world_size"])
        if self._started_once or self.tracker is None:
            self._started_once = True
            return
        self._started_once = True
        self._log_layout(event)

    def _log_layout(self, event: dict) -> None:
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
        kind = event["peak_flops_source"].split(":")[0].split(" ")[0]   # datasheet | calibrated
        self.tracker.set_tag("foldmoe.peak_flops_kind", kind)
        self.tracker.log_text(layout_text(world, layout, groups), "layout.txt")
        self.tracker.log_text(json.dumps({"world_size": world, "layout": layout, "groups": groups},
                                         indent=1), "layout.json")
        if self.plan is not None:
            text, doc = self.plan(world)
            self.tracker.log_text(text, "plan.txt")
            self.tracker.log_text(json.dumps(doc, indent=1), "plan.json")

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
        if self.stats.world_size is not None:
            record.setdefault("world_size", self.stats.world_size)
        s = self.stats
        s.steps_seen += 1
        s.tokens += float(record.get("tokens", 0.0))
        if s.first_step_at is None:
            s.first_step_at = record["time"]
        if self._first_step_of_group:
            self.progress.end_phase(record["time"])
            self.progress.new_group()       # the recovery is not a step's time (the ETA)
        elif isinstance(record.get("tokens_per_s"), (int, float)):
            # steady state: the first step of each worker group is warm-up
            s.steady_tokens_per_s.append(float(record["tokens_per_s"]))
            s.steady_mfu.append(float(record.get("mfu", 0.0)))
        self._first_step_of_group = False
        if record.get("preempted"):
            self._preempted_save = record["step"] + 1     # workers/loop.py saves step + 1
        self._on_group_first_step(record)
        # The driver's count (every group start), not the worker's (groups it saw come up).
        record["restarts"] = self.accounting.restarts
        s.restarts = self.accounting.restarts
        s.last_record = record
        if self.tracker is not None:
            self.tracker.log_step(record["step"], record, record["time"])
        for sink in self.sinks:
            sink.step(record)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        self.progress.update(record)
        if isinstance(record.get("val_loss"), (int, float)):
            self.progress.note(f"step {record['step'] + 1}: val_loss {record['val_loss']:.4f} (held-out split)")

    def hang_cause(self) -> str | None:
        """The watchdog's line for the last hung rank it stopped, if any."""
        hangs = [e for e in self.stats.faults if e["type"] == "hang"]
        return hangs[-1]["message"] if hangs else None

    def _on_group_first_step(self, record: dict) -> None:
        """A restarted group's first step: recovery_s goes into its record (MLflow
        cluster/recovery_s at that step, --metrics-jsonl) and the display."""
        group = self.stats.groups.step(record)
        if group is None or group.index == 0:
            return
        if group.recovery_s is not None:
            record["recovery_s"] = group.recovery_s
            self.progress.note(f"recovered in {group.recovery_s:.1f} s ({group.cause} -> step "
                               f"{record['step']} done on {group.world_size} workers)")
        if self.tracker is not None:
            self.tracker.log_text(json.dumps([g.as_dict() for g in self.stats.groups.groups],
                                             indent=1), "worker_groups.json")

    @property
    def finished_all_steps(self) -> bool:
        last = self.stats.last_record
        return last is not None and last["step"] + 1 >= self.total_steps

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self.tracker is not None and not self._accounting_logged:
            self._accounting_logged = True
            a = self.accounting
            for key, value in (("restarts", a.restarts), ("group_starts", a.group_starts),
                               ("failures", len(a.failures)), ("checkpoint_fallbacks", len(a.fallbacks))):
                self.tracker.log_metric(f"job/{key}", value, step=0)
            self.tracker.set_tag("foldmoe.restarts", str(a.restarts))
            self.tracker.log_text(json.dumps(a.as_dict(), indent=1, default=str), "restarts.json")

    def summary(self, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        s = self.stats
        median = (lambda v: statistics.median(v) if v else None)
        a = self.accounting
        return {"job_time_s": now - s.driver_start,
                "time_to_first_step_s": (s.first_step_at - s.driver_start) if s.first_step_at else None,
                "restarts": a.restarts, "group_starts": a.group_starts, "failures": len(a.failures),
                "checkpoint_fallbacks": a.fallbacks, "steps_seen": s.steps_seen,
                "last_step": s.last_record["step"] if s.last_record else None,
                "resumed_from_step": s.resumed_from_step, "tokens": s.tokens,
                "tokens_per_s": median(s.steady_tokens_per_s), "mfu": median(s.steady_mfu),
                "recovery_s": s.groups.recovery_s(),
                "world_sizes": [g.world_size for g in s.groups.groups],
                "peak_flops_source": s.start_info.get("peak_flops_source"),
                "final_loss": s.last_record.get("loss") if s.last_record else None}
