"""Restart accounting (orchestrator/accounting.py, the observer, the Ray Train relay) and
the liveness check behind marking abandoned MLflow runs KILLED (orchestrator/stale_runs.py)."""
from __future__ import annotations

import json
import subprocess
import sys

from orchestrator.observer import JobObserver
from orchestrator.progress import ProgressDisplay
from orchestrator.stale_runs import TAG, driver_alive, identity_tags
from orchestrator.summary import restarts_text
from workers.events import EventTail

from .test_observer import START, RecordingTracker, _step


def _observer(tracker=None):
    return JobObserver(total_steps=6, tracker=tracker, progress=ProgressDisplay(6, live=False),
                       metrics_jsonl=None, layout_groups=lambda world: {"tp": [[0, 1]]},
                       driver_start=90.0)


def test_two_identical_failures_are_two_restarts_in_the_summary_and_mlflow(capsys):
    tracker = RecordingTracker()
    obs = _observer(tracker)
    failure = {"type": "failure", "error": "RuntimeError: the same thing again"}
    events = [{"type": "group_start", "group": 1, "time": 99.0}, {"type": "placed", "time": 100.0},
              START, _step(0, 5.0, 104.0), _step(1, 4.0, 105.0), dict(failure, time=106.0)]
    # Group 2 dies before its rank 0 runs (no "placed"): only the controller saw it start.
    events += [{"type": "group_start", "group": 2, "time": 107.0}, dict(failure, time=108.0)]
    events += [{"type": "group_start", "group": 3, "time": 109.0}, {"type": "placed", "time": 110.0},
               {"type": "checkpoint_fallback", "time": 111.0, "message": "warning: checkpoint x failed"},
               dict(START, time=112.0, resumed_from_step=1, restarts=1),
               _step(1, 4.0, 113.0, restarts=1), _step(2, 3.0, 114.0, restarts=1)]
    for event in events:
        obs.handle(event)
    obs.close()
    summary = obs.summary(now=120.0)
    assert (summary["restarts"], summary["group_starts"], summary["failures"]) == (2, 3, 2)
    assert restarts_text(summary).startswith("2 (3 worker groups, 2 failures; recovery 7.0 s")
    # Every step carries the driver's count (the worker of group 3 saw one group before it).
    assert [r for _, _, r in tracker.steps] == [0, 0, 2, 2]
    metrics = {key: value for key, value, _ in tracker.metrics}
    assert metrics["job/restarts"] == 2 and metrics["job/group_starts"] == 3
    assert metrics["job/failures"] == 2 and metrics["job/checkpoint_fallbacks"] == 1
    assert tracker.tags["foldmoe.restarts"] == "2"
    groups = json.loads(tracker.texts["restarts.json"])["groups"]
    assert [g["cause"] for g in groups] == ["first start", "failure 1: RuntimeError: the same thing again",
                                            "failure 2: RuntimeError: the same thing again"]
    assert groups[2]["resumed_from_step"] == 1 and groups[2]["fallbacks"] == ["warning: checkpoint x failed"]
    out = capsys.readouterr()
    assert "worker group 3 up (restart 2, after failure 2: RuntimeError: the same thing again): " \
           "world size 4, tp2 cp1 pp1 ep4 etp1 (dp2 edp1), resumed at step 1" in out.out
    assert "warning: checkpoint x failed" in out.err


def test_a_fatal_event_is_what_the_driver_reports():
    obs = _observer()
    assert obs.fatal_error is None
    obs.handle({"type": "placed", "time": 1.0})
    obs.handle({"type": "fatal", "time": 2.0, "error": "checkpoint.dir=/x: no checkpoint verifies"})
    assert obs.fatal_error == "checkpoint.dir=/x: no checkpoint verifies"


class _Group:
    def get_workers(self):
        return [object()] * 4


class _Status:
    def __init__(self, errors):
        self.errors = errors


def test_the_ray_relay_counts_one_failure_per_group_however_alike(tmp_path):
    from orchestrator.ray_callbacks import FailureRelay

    path = str(tmp_path / "controller.jsonl")
    relay = FailureRelay(path)
    same = {1: RuntimeError("connection reset")}
    for _ in range(2):
        relay.after_worker_group_start(_Group())
        relay.after_worker_group_poll_status(_Status({}))
        relay.after_worker_group_poll_status(_Status(same))
        relay.after_worker_group_poll_status(_Status(same))     # still seen on the next poll
    events = EventTail(path).read()
    assert [(e["type"], e.get("group")) for e in events] == [
        ("group_start", 1), ("failure", 1), ("group_start", 2), ("failure", 2)]
    assert events[-1]["failures"] == 2 and events[-1]["error"] == "RuntimeError: connection reset"
    assert events[0]["world_size"] == 4


def test_driver_liveness_is_checked_by_pid_start_time_and_boot():
    mine = identity_tags()
    assert driver_alive(mine) is True
    assert driver_alive({**mine, TAG + "host": "another-host"}) is None    # cannot tell
    assert driver_alive({**mine, TAG + "started": str(float(mine[TAG + "started"]) - 60)}) is False
    assert driver_alive({**mine, TAG + "boot": "1"}) is False              # rebooted since
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    assert driver_alive({**mine, TAG + "pid": gone}) is False


def test_the_eta_counts_the_wall_time_between_steps(capsys):
    # step_time_s leaves out data, reporting, evaluation and checkpoint stalls: with an
    # evaluation of 9 s after every 1 s step the ETA must be 10 s a step, not 1 s.
    from orchestrator.progress import ProgressDisplay

    progress = ProgressDisplay(10, live=False)
    for step in range(3):
        progress.update({"step": step, "time": 100.0 + 10 * step, "step_time_s": 1.0, "loss": 1.0})
    assert progress.eta_s() == (1.0 + 10 + 10) / 3
    progress.update({"step": 1, "time": 500.0, "step_time_s": 1.0, "loss": 1.0})   # a restarted group
    assert progress._step_times[-1] == 1.0
    progress.new_group()                      # a group resumed right after the last step
    progress.update({"step": 3, "time": 900.0, "step_time_s": 1.0, "loss": 1.0})
    assert progress._step_times[-1] == 1.0    # the recovery is not counted as a step


def test_ray_trains_wrapped_errors_read_as_what_the_workers_raised():
    # Ray Train V2 wraps a worker's exception in UserExceptionWithTraceback (its str() is the
    # whole traceback) and a failed fit() in a WorkerGroupError holding each rank's.
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    from orchestrator.errors import describe_error
    try:
        raise OSError(28, "No space left on device")
    except OSError as err:
        import traceback
        wrapped = UserExceptionWithTraceback(err, traceback.format_exc())
    assert str(wrapped).startswith("Traceback (most recent call last):")
    assert describe_error(wrapped) == "OSError: [Errno 28] No space left on device"
    group = WorkerGroupError("Training failed due to worker errors:\n...", {1: wrapped, 3: RuntimeError("x")})
    assert describe_error(group) == "rank 1: OSError: [Errno 28] No space left on device"
    assert describe_error(RuntimeError("plain")) == "RuntimeError: plain"
