"""MLflow tracking from the driver: exactly one run per job, one writing process.

Uses MlflowClient with an explicit run id (no fluent global state), so worker-group
restarts simply keep logging into the same run. A tracking-store outage during training
prints one warning and does not stop the job.
"""
from __future__ import annotations

import os
import pathlib
import sys
import tempfile
import time
from typing import Any

DEFAULT_URI_FILE = "mlflow.db"
# Per-step metrics logged to MLflow (when present in the step record).
STEP_METRICS = (
    "loss", "lm_loss", "aux_loss", "z_loss", "grad_norm", "lr", "tokens_per_s",
    "tflops_per_device", "mfu", "step_time_s", "dropped_token_fraction", "load_imbalance",
    "restarts", "memory_peak_bytes", "build_peak_bytes", "param_bytes")   # plus every comm_bytes_<axis> (dp, ep, tp, cp, pp: bytes sent per step)
_PARAM_BATCH = 100      # MLflow accepts at most 100 params per log_batch
_PARAM_MAX_CHARS = 6000


def resolve_tracking_uri(configured: str | None) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working dir."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return "sqlite:///" + os.path.abspath(DEFAULT_URI_FILE)


def _artifacts_beside_sqlite(uri: str) -> str | None:
    """For a SQLite store, artifacts go to mlruns/ next to the database file rather than
    next to whatever the working directory is; other stores keep their server default."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    db_dir = os.path.dirname(os.path.abspath(uri[len(prefix):]))
    return pathlib.Path(db_dir, "mlruns").as_uri()


class Tracker:
    def __init__(self, uri: str, experiment: str, run_name: str, tags: dict[str, str] | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(
            experiment, artifact_location=_artifacts_beside_sqlite(uri))
        run = self.client.create_run(experiment_id, run_name=run_name, tags=tags or {})
        self.run_id = run.info.run_id
        self.experiment_id = experiment_id
        self._warned = False
        self._finished = False

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)[:_PARAM_MAX_CHARS]) for key, value in params.items()]
        for i in range(0, len(items), _PARAM_BATCH):
            self._safely(self.client.log_batch, self.run_id, params=items[i:i + _PARAM_BATCH])

    def log_step(self, step: int, record: dict, timestamp_s: float | None = None) -> None:
        from mlflow.entities import Metric

        ts = int((timestamp_s or time.time()) * 1000)
        keys = [*STEP_METRICS, *sorted(k for k in record if k.startswith("comm_bytes_"))]
        metrics = [Metric(key, float(record[key]), ts, step)
                   for key in keys if isinstance(record.get(key), (int, float))]
        self._safely(self.client.log_batch, self.run_id, metrics=metrics)

    def log_metric(self, key: str, value: float, step: int) -> None:
        self._safely(self.client.log_metric, self.run_id, key, value, step=step)

    def log_text(self, text: str, file_name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, file_name)
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text)
            self._safely(self.client.log_artifact, self.run_id, path)

    def set_tag(self, key: str, value: str) -> None:
        self._safely(self.client.set_tag, self.run_id, key, value)

    def finish(self, status: str) -> None:
        """status: FINISHED, FAILED or KILLED. Idempotent."""
        if not self._finished:
            self._finished = True
            self._safely(self.client.set_terminated, self.run_id, status)

    def _safely(self, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - tracking must not kill training
            if not self._warned:
                self._warned = True
                print(f"warning: MLflow logging failed ({type(err).__name__}: {err}); "
                      "training continues", file=sys.stderr)
