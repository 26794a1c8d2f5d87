"""The driver-side event consumer: what reaches MLflow, the JSONL and the summary."""
from __future__ import annotations

import json

from orchestrator.metric_names import grouped_metrics
from orchestrator.observer import JobObserver, layout_text
from orchestrator.progress import ProgressDisplay
from orchestrator.tracking import Tracker, resolve_tracking_uri, run_link


class RecordingTracker:
    def __init__(self):
        self.params, self.steps, self.texts, self.tags, self.metrics = {}, [], {}, {}, []

    def log_metric(self, key, value, step):
        self.metrics.append((key, value, step))

    def set_tag(self, key, value):
        self.tags[key] = value

    def log_params(self, params):
        self.params.update(params)

    def log_step(self, step, record, timestamp_s=None):
        self.steps.append((step, record["loss"], record.get("restarts")))

    def log_text(self, text, name):
        self.texts[name] = text


START = {"type": "start", "time": 100.0, "world_size": 4, "restarts": 0, "resumed_from_step": None,
         "layout": {"world_size": 4, "tp": 2, "cp": 1, "pp": 1, "ep": 4, "etp": 1, "vpp": 1},
         "peak_flops": 1e11, "peak_flops_source": "measured on CPU", "device": "cpu",
         "params": {"total": 1000, "active": 600}}


def _step(step, loss, t, restarts=0, tokens_per_s=10.0):
    return {"type": "step", "time": t, "step": step, "loss": loss, "restarts": restarts,
            "step_time_s": 0.5, "tokens_per_s": tokens_per_s, "mfu": 0.01, "tokens": 64.0}


def test_observer_logs_params_once_and_every_step(tmp_path):
    tracker, jsonl = RecordingTracker(), tmp_path / "m.jsonl"
    groups = {"tp": [[0, 1], [2, 3]], "ep": [[0, 1, 2, 3]]}
    sink = []

    class Sink:
        def step(self, record):
            sink.append((record["step"], record["world_size"]))

    obs = JobObserver(total_steps=3, tracker=tracker, progress=ProgressDisplay(3, live=False),
                      metrics_jsonl=str(jsonl), layout_groups=lambda world: groups, driver_start=90.0,
                      plan=lambda world: (f"plan for {world}\n", {"world_size": world}), sinks=[Sink()])
    for event in [START, _step(0, 5.0, 104.0), _step(1, 4.0, 105.0, tokens_per_s=30.0),
                  {"type": "failure", "time": 106.0, "restarts": 1, "error": "killed"},
                  dict(START, restarts=1, resumed_from_step=1, time=120.0),
                  _step(1, 4.0, 121.0, restarts=1), _step(2, 3.0, 122.0, restarts=1, tokens_per_s=20.0)]:
        obs.handle(event)
    obs.close()
    assert sink == [(0, 4), (1, 4), (1, 4), (2, 4)]
    assert tracker.texts["plan.txt"] == "plan for 4\n" and tracker.tags["foldmoe.peak_flops_kind"] == "measured"
    assert tracker.params["layout.dp"] == 2 and tracker.params["layout.edp"] == 1
    assert tracker.params["params.active"] == 600
    assert tracker.steps == [(0, 5.0, 0), (1, 4.0, 0), (1, 4.0, 1), (2, 3.0, 1)]
    assert "tp      [0, 1] [2, 3]" not in tracker.texts["layout.txt"]   # width = longest axis name
    assert "  tp  [0, 1] [2, 3]" in tracker.texts["layout.txt"]
    assert [json.loads(l)["step"] for l in jsonl.read_text().splitlines()] == [0, 1, 1, 2]
    summary = obs.summary(now=130.0)
    assert summary["time_to_first_step_s"] == 14.0 and summary["job_time_s"] == 40.0
    assert summary["restarts"] == 1 and summary["final_loss"] == 3.0
    assert summary["recovery_s"] == [15.0]          # failure at 106 -> next step at 121
    assert summary["tokens"] == 4 * 64.0            # the re-run step 1 trained again
    # steady state = not the first step of a worker group: 30 (group 1), 20 (group 2)
    assert summary["tokens_per_s"] == 25.0 and summary["resumed_from_step"] is None
    assert obs.finished_all_steps


def test_layout_text_derives_dp_and_edp():
    text = layout_text(8, {"tp": 2, "cp": 1, "pp": 2, "ep": 2, "etp": 1}, {"pp": [[0, 4]]})
    assert text.startswith("world size 8: attention tp=2 cp=1 dp=2 pp=2; MoE etp=1 ep=2 edp=2 pp=2")


def test_default_tracking_uri_is_sqlite_in_the_working_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(None) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_tracker_survives_a_dead_tracking_store(tmp_path, capsys):
    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}", "exp", "run")
    class Down:                     # the store goes away mid-run
        def __getattr__(self, name):
            def fail(*args, **kwargs):
                raise ConnectionError("tracking server unreachable")
            return fail

    tracker.client = Down()
    tracker.log_step(0, {"loss": 1.0})
    tracker.log_step(1, {"loss": 1.0})
    assert not tracker.flush(0.5)                  # the calls wait for the store to return
    assert capsys.readouterr().err.count("MLflow logging failed") == 1


def test_sqlite_artifacts_live_beside_the_database(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "..")          # not where the database is
    store = tmp_path / "store"
    tracker = Tracker(f"sqlite:///{store / 'mlflow.db'}", "exp", "run")
    tracker.log_text("hello\n", "note.txt")
    tracker.finish("FINISHED")
    (artifact,) = store.glob("mlruns/*/artifacts/note.txt")   # mlruns/<run id>/artifacts
    assert artifact.read_text() == "hello\n"


def test_grouped_metric_names_for_mlflow():
    record = {"step": 3, "time": 1.0, "loss": 2.5, "aux_loss": 0.1, "tokens_per_s": 9.0, "mfu": 0.2,
              "step_time_s": 0.5, "time_forward_backward_s": 0.4, "comm_bytes_ep": 4.0,
              "load_imbalance": 1.5, "load_imbalance_by_layer": {"1": 1.25, "12": 2.0},
              "restarts": 1, "world_size": 4, "checkpointed": True, "tokens": 64.0}
    assert grouped_metrics(record) == {
        "train/loss": 2.5, "train/aux_loss": 0.1, "throughput/tokens_per_s": 9.0,
        "throughput/mfu": 0.2, "time/step_s": 0.5, "time/forward_backward_s": 0.4,
        "comm/bytes_ep": 4.0, "moe/load_imbalance": 1.5, "moe/load_imbalance_layer_01": 1.25,
        "moe/load_imbalance_layer_12": 2.0, "cluster/restarts": 1.0, "cluster/world_size": 4.0}


def test_run_links():
    assert run_link("http://127.0.0.1:5000/", "3", "abc") == "http://127.0.0.1:5000/#/experiments/3/runs/abc"
    assert run_link("sqlite:////x/m.db", "1", "abc") == (
        "mlflow ui --backend-store-uri sqlite:////x/m.db  ->  http://127.0.0.1:5000/#/experiments/1/runs/abc")


def test_phases_print_their_elapsed_time_and_a_heartbeat(capsys, monkeypatch):
    clock = iter([100.0, 131.0, 131.0, 140.5])
    monkeypatch.setattr("orchestrator.progress.time.time", lambda: next(clock))
    progress = ProgressDisplay(3, live=False, heartbeat_s=30.0)
    progress.phase("place workers")                           # t = 100
    progress.tick(lambda: "4 CPU needed, 2 free")             # t = 131: a heartbeat
    progress.phase("first step")                              # t = 131: ends place workers
    progress.end_phase()                                      # t = 140.5
    assert capsys.readouterr().out.splitlines() == [
        "place workers ...", "still place workers after 31 s (4 CPU needed, 2 free)",
        "  place workers: 31.0 s", "first step ...", "  first step: 9.5 s"]


def test_a_preempted_group_is_not_reported_as_a_crash(capsys):
    obs = JobObserver(total_steps=4, tracker=None, progress=ProgressDisplay(4, live=False),
                      metrics_jsonl=None, layout_groups=lambda world: {}, driver_start=90.0)
    health = "WorkerHealthCheckFailedError: A worker health check failed."
    for event in [START, dict(_step(0, 5.0, 104.0), preempted=True),
                  {"type": "failure", "time": 106.0, "error": health},
                  dict(START, resumed_from_step=1, time=120.0), _step(1, 4.0, 121.0),
                  {"type": "failure", "time": 122.0, "error": "RuntimeError: connection reset"}]:
        obs.handle(event)
    notes = [line.split(": world size")[0] for line in capsys.readouterr().out.splitlines()
             if line.startswith("worker group ") and "failure " in line]
    preempted = ("failure 1: preempted, a worker got SIGTERM and every rank saved step 1; "
                 f"the launcher saw {health}")
    assert notes == [
        f"worker group preempted ({preempted}); restarting from the newest checkpoint that verifies",
        f"worker group 2 up (restart 1, after {preempted})",
        "worker group failed (failure 2: RuntimeError: connection reset); restarting from the newest "
        "checkpoint that verifies"]
    assert obs.accounting.failures[0]["preempted_step"] == 1 and "preempted_step" not in obs.accounting.failures[1]
