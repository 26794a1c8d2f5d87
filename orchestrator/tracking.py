"""MLflow tracking from the driver: exactly one run per job, one writing process.

Uses MlflowClient with an explicit run id (no fluent global state), so worker-group
restarts simply keep logging into the same run. A tracking-store outage during training
prints one warning and neither stops nor stalls the job: the calls run on their own thread
and wait for the store (orchestrator/tracking_sender.py). Step metrics carry grouped names
(orchestrator/metric_names.py); the driver's CPU, memory, disk and network go to
`system/*` through MLflow's own system-metrics monitor.
"""
from __future__ import annotations

import os
import pathlib
import sys
import time
from typing import Any

from .metric_names import grouped_metrics
from .tracking_sender import BackgroundSender
from .stale_runs import identity_tags, mark_abandoned_runs

DEFAULT_URI_FILE = "mlflow.db"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PARAM_BATCH = 100      # MLflow accepts at most 100 params per log_batch
_PARAM_MAX_CHARS = 6000
FLUSH_S = 60.0          # how long the end of a job waits for an unreachable store


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


def source_tags(entrypoint: str, command: str, in_ray_job: bool) -> dict[str, str]:
    """MLflow's run-context tags (mlflow.user, mlflow.source.*), with the source named by
    foldmoe's entrypoint and the git state of the foldmoe code itself (the process's
    main file may be a console script outside the repository)."""
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils.git_utils import get_git_branch, get_git_commit, get_git_repo_url

    tags = dict(resolve_tags())
    tags.update({"mlflow.source.name": entrypoint, "foldmoe.command": command[:5000],
                 "mlflow.source.type": "JOB" if in_ray_job else "LOCAL"})
    for key, value in (("commit", get_git_commit(REPO_ROOT)), ("branch", get_git_branch(REPO_ROOT)),
                       ("repoURL", get_git_repo_url(REPO_ROOT))):
        if value:
            tags[f"mlflow.source.git.{key}"] = value
    return tags


def run_link(uri: str, experiment_id: str, run_id: str) -> str:
    """Where to see the run: its page on a server, or how to open it for a local store."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {uri}  ->  http://127.0.0.1:5000/{page}"


class Tracker:
    def __init__(self, uri: str, experiment: str, run_name: str, tags: dict[str, str] | None = None,
                 warn=None):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self._warn = warn or (lambda message: print(message, file=sys.stderr, flush=True))
        self._system_metrics = None
        self.report = True            # render the review report when the run ends
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(
            experiment, artifact_location=_artifacts_beside_sqlite(uri))
        self.abandoned_runs = self._mark_abandoned(experiment_id) if found else []
        run = self.client.create_run(experiment_id, run_name=run_name,
                                     tags={**(tags or {}), **identity_tags()})
        self.run_id = run.info.run_id
        self.experiment_id = experiment_id
        self._finished = False
        self._sender = BackgroundSender(self._warn)

    def _mark_abandoned(self, experiment_id: str) -> list[str]:
        """Runs of this experiment left RUNNING by a driver that died (orchestrator/stale_runs.py)."""
        try:
            return mark_abandoned_runs(self.client, experiment_id, self._warn)
        except Exception as err:  # noqa: BLE001 - a stale run must not stop a new job
            self._warn(f"warning: could not check the experiment for abandoned runs "
                       f"({type(err).__name__}: {err})")
            return []

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)[:_PARAM_MAX_CHARS]) for key, value in params.items()]
        for i in range(0, len(items), _PARAM_BATCH):
            self._safely(self.client.log_batch, self.run_id, params=items[i:i + _PARAM_BATCH])

    @property
    def link(self) -> str:
        return run_link(self.uri, self.experiment_id, self.run_id)

    def log_step(self, step: int, record: dict, timestamp_s: float | None = None) -> None:
        from mlflow.entities import Metric

        ts = int((timestamp_s or time.time()) * 1000)
        metrics = [Metric(key, value, ts, step) for key, value in grouped_metrics(record).items()]
        self._safely(self.client.log_batch, self.run_id, metrics=metrics)

    def start_system_metrics(self) -> None:
        """MLflow's system-metrics monitor on this run (a thread sampling psutil every
        $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL s, default 10); the driver's machine only."""
        import logging

        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
            monitor = SystemMetricsMonitor(self.run_id, tracking_uri=self.uri)
            monitor.start()
            self._system_metrics = monitor
        except Exception as err:  # noqa: BLE001 - psutil missing, store down: training goes on
            self._warn(f"warning: MLflow system metrics are off ({type(err).__name__}: {err})")

    def log_artifacts(self, directory: str, artifact_path: str | None = None) -> None:
        self._safely(self.client.log_artifacts, self.run_id, directory, artifact_path)

    def log_metric(self, key: str, value: float, step: int) -> None:
        self._safely(self.client.log_metric, self.run_id, key, value, step=step)

    def log_text(self, text: str, file_name: str) -> None:
        self._safely(self.client.log_text, self.run_id, text, file_name)

    def set_tag(self, key: str, value: str) -> None:
        self._safely(self.client.set_tag, self.run_id, key, value)

    def flush(self, timeout_s: float = FLUSH_S) -> bool:
        """Waits until every logged value is in the store (before reading the run back)."""
        return self._sender.flush(timeout_s)

    def finish(self, status: str, timeout_s: float = FLUSH_S) -> None:
        """status: FINISHED, FAILED or KILLED. Idempotent. Waits up to timeout_s for the
        calls still queued (an unreachable store), then gives up on them, saying so."""
        if not self._finished:
            self._finished = True
            if self._system_metrics is not None:
                self._system_metrics.finish()
            self._safely(self.client.set_terminated, self.run_id, status)
            undelivered = self._sender.close(timeout_s)
            if undelivered:
                self._warn(f"warning: {undelivered} MLflow calls (the last metrics and the run's "
                           f"status {status}) could not be delivered in {timeout_s:g} s; the run "
                           "stays RUNNING in MLflow until a later driver on this host marks it")

    def _safely(self, fn, *args, **kwargs) -> None:
        """Queued on the sender's thread (orchestrator/tracking_sender.py): never blocks."""
        self._sender.submit(fn, *args, **kwargs)
