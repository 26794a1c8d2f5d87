"""Tracking calls never stall the driver (orchestrator/tracking_sender.py): they run in order
on their own thread, an outage is one warning and is retried, and the end of the job says
what was not delivered. With MLflow's default retries one call to a dead server takes about
4 minutes, and the driver logs every step."""
import time

from orchestrator.tracking import Tracker
from orchestrator.tracking_sender import BackgroundSender


class FlakyStore:
    """Fails (slowly) until `down` is cleared; records what it received."""

    def __init__(self, delay_s=0.2):
        self.down, self.delay_s, self.got = True, delay_s, []

    def log(self, value):
        if self.down:
            time.sleep(self.delay_s)
            raise ConnectionError("connection refused")
        self.got.append(value)


def test_an_outage_neither_stalls_the_caller_nor_loses_or_reorders_calls():
    store, warnings = FlakyStore(), []
    sender = BackgroundSender(warnings.append, retry_s=0.05)
    start = time.monotonic()
    for step in range(20):
        sender.submit(store.log, step)
    assert time.monotonic() - start < 0.1          # 20 calls to a failing store: no wait
    time.sleep(0.5)
    assert store.got == [] and len(warnings) == 1 and "retried every 0.05 s" in warnings[0]
    store.down = False
    assert sender.flush(5.0)
    assert store.got == list(range(20))
    assert len(warnings) == 2 and warnings[1].startswith("MLflow logging resumed after")
    assert sender.close(1.0) == 0


def test_what_cannot_be_delivered_is_counted_at_the_end():
    store, warnings = FlakyStore(delay_s=0.0), []
    sender = BackgroundSender(warnings.append, retry_s=10.0)
    for step in range(3):
        sender.submit(store.log, step)
    assert not sender.flush(0.3)
    assert sender.close(0.2) == 3 and len(warnings) == 1


def test_beyond_max_pending_the_oldest_calls_go_first():
    store = FlakyStore(delay_s=0.0)
    sender = BackgroundSender(lambda message: None, retry_s=0.05, max_pending=5)
    for step in range(12):
        sender.submit(store.log, step)
    store.down = False
    assert sender.flush(5.0) and store.got[-5:] == list(range(7, 12)) and sender.dropped >= 6


def test_the_tracker_logs_through_the_sender(tmp_path, monkeypatch):
    warnings = []
    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}", "exp", "run", warn=warnings.append)
    real = tracker.client.log_batch
    monkeypatch.setattr(tracker.client, "log_batch", lambda *a, **k: (time.sleep(1.0), real(*a, **k)))
    start = time.monotonic()
    tracker.log_step(0, {"loss": 2.0})
    assert time.monotonic() - start < 0.2
    tracker.finish("FINISHED")
    run = tracker.client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["train/loss"] == 2.0, run.data.metrics
    assert warnings == []


def test_a_call_the_store_refuses_is_dropped_and_does_not_hold_back_the_others():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    got, warnings = [], []

    def refuse(value):
        raise MlflowException(f"bad value {value}", error_code=INVALID_PARAMETER_VALUE)

    sender = BackgroundSender(warnings.append, retry_s=30.0)
    sender.submit(refuse, "nan")
    sender.submit(got.append, 1)
    assert sender.flush(2.0) and got == [1]
    assert len(warnings) == 1 and warnings[0].startswith("warning: MLflow refused refuse")
