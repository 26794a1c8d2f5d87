"""The driver's worker-group history: every (re)start with its cause, world size, layout,
resumed step and recovery_s, as the observer turns the event files into records."""
from __future__ import annotations

import json

from orchestrator.metric_names import grouped_metrics
from orchestrator.observer import JobObserver
from orchestrator.progress import ProgressDisplay
from orchestrator.summary import summary_rows

from .test_observer import START, RecordingTracker, _step

ON_TWO = {"world_size": 2, "tp": 2, "cp": 1, "pp": 1, "ep": 2, "etp": 1, "vpp": 1}


def _elastic_events() -> list[dict]:
    return [{"type": "schedule", "time": 95.0, "workers": 4}, START,
            _step(0, 5.0, 104.0), _step(1, 4.5, 105.0), _step(2, 4.0, 106.0),
            {"type": "failure", "time": 107.0, "error": "node lost"},
            {"type": "schedule", "time": 107.0, "workers": 4},     # the stale size, then
            {"type": "schedule", "time": 122.0, "workers": 2},     # the size that fits
            dict(START, time=130.0, world_size=2, layout=ON_TWO, restarts=1, resumed_from_step=2),
            _step(2, 4.0, 131.0, restarts=1), _step(3, 3.5, 132.0, restarts=1),
            {"type": "resize", "time": 133.0, "workers": 4, "previous_workers": 2},
            {"type": "schedule", "time": 133.0, "workers": 4},
            dict(START, time=150.0, restarts=2, resumed_from_step=4),
            _step(4, 3.0, 152.0, restarts=2)]


def test_each_restart_records_cause_size_layout_resumed_step_and_recovery(tmp_path, capsys):
    tracker, jsonl = RecordingTracker(), tmp_path / "m.jsonl"
    obs = JobObserver(total_steps=5, tracker=tracker, progress=ProgressDisplay(5, live=False),
                      metrics_jsonl=str(jsonl), layout_groups=lambda world: {"tp": [[0, 1]]},
                      driver_start=90.0)
    for event in _elastic_events():
        obs.handle(event)
    obs.close()
    groups = obs.stats.groups.groups
    assert [(g.cause, g.world_size, g.resumed_from_step) for g in groups] == [
        ("start", 4, None), ("failure", 2, 2), ("resize", 4, 4)]
    assert groups[1].layout == ON_TWO and groups[2].resized == (2, 4)
    # failure at 107 -> first step of the 2-worker group at 131; resize at 133 -> 152
    assert [g.recovery_s for g in groups] == [None, 24.0, 19.0]
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r.get("recovery_s") for r in records] == [None] * 3 + [24.0, None, 19.0]
    assert [r["world_size"] for r in records] == [4, 4, 4, 2, 2, 4]
    assert grouped_metrics(records[3])["cluster/recovery_s"] == 24.0
    history = json.loads(tracker.texts["worker_groups.json"])
    assert [g["cause"] for g in history] == ["start", "failure", "resize"]
    shown = capsys.readouterr().out
    assert ("worker group 2 up (restart 1, after failure 1: node lost): world size 2, "
            "tp2 cp1 pp1 ep2 etp1 (dp1 edp1), resumed at step 2") in shown
    assert "worker group 3 up (restart 2, resized 2 -> 4 workers): world size 4" in shown
    assert "recovered in 19.0 s (resize -> step 4 done on 4 workers)" in shown
    assert "place 2 workers" in shown and "resizing the worker group: 2 -> 4 workers" in shown
    summary = obs.summary(now=160.0)
    assert summary["recovery_s"] == [24.0, 19.0] and summary["world_sizes"] == [4, 2, 4]
    rows = dict(summary_rows(summary, total_steps=5, checkpoint_dir="c", newest_checkpoint=None,
                             job_dir="j", mlflow_link=None, ray_errors=None))
    assert rows["restarts"] == "2 (3 worker groups, 1 failure; recovery 24.0 s, 19.0 s; world size 4 -> 2 -> 4)"


def test_without_a_controller_record_recovery_starts_at_the_last_step():
    """torchrun, or a Ray without the controller hooks: the new group's start is all there is."""
    obs = JobObserver(total_steps=3, tracker=None, progress=ProgressDisplay(3, live=False),
                      metrics_jsonl=None, layout_groups=lambda world: {}, driver_start=90.0)
    for event in [START, _step(0, 5.0, 104.0), dict(START, time=110.0, restarts=1, resumed_from_step=0),
                  _step(0, 5.0, 112.5, restarts=1)]:
        obs.handle(event)
    (_, restarted) = obs.stats.groups.groups
    assert restarted.cause == "restart" and restarted.recovery_s == 8.5
