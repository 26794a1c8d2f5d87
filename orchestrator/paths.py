"""Durable paths for a driver started by `ray job submit` (also what a KubeRay RayJob does).

Such a driver runs in Ray's temporary copy of `--working-dir` (under the session's
runtime_resources), which Ray deletes with its temporary files: a relative job dir,
checkpoint dir, data cache or SQLite store would be written there and lost. So under a
Ray job `cluster.storage_path` must be absolute, and the other relative paths are
resolved under it (checkpoint.dir -> <storage_path>/<dir>, the default MLflow store ->
<storage_path>/mlflow.db); a relative storage_path is refused with the fix.
"""
from __future__ import annotations

import dataclasses
import os

from .config import ConfigError, RunConfig

RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"    # set by Ray's job supervisor for the driver
SQLITE = "sqlite:///"


def in_ray_job() -> bool:
    return RAY_JOB_ENV in os.environ


def durable_paths(run: RunConfig, in_job: bool | None = None) -> RunConfig:
    """The run with every path absolute and outside the runtime-env copy (no-op outside a job)."""
    if not (in_ray_job() if in_job is None else in_job):
        return run
    s = run.schema
    storage = s.cluster.storage_path
    if not os.path.isabs(storage):
        raise ConfigError(
            f"cluster.storage_path={storage}: a relative path, and this driver runs under "
            f"`ray job submit`, whose working dir ({os.getcwd()}) is Ray's temporary copy of "
            "--working-dir, deleted with Ray's temporary files; set cluster.storage_path to an "
            "absolute path on storage the nodes share (relative checkpoint.dir, data.cache_dir "
            "and the default MLflow store are then placed under it)")

    def under(path: str) -> str:
        return path if os.path.isabs(path) else os.path.join(storage, path)

    checkpoint = s.checkpoint.model_copy(update={"dir": under(run.checkpoint_dir)})
    data = s.data.model_copy(update={"cache_dir": under(s.data.cache_dir)})
    tracking = s.tracking.model_copy(update={"uri": _durable_uri(s.tracking.uri, storage)})
    schema = s.model_copy(update={"checkpoint": checkpoint, "data": data, "tracking": tracking})
    return dataclasses.replace(run, schema=schema)


def _durable_uri(uri: str | None, storage: str) -> str | None:
    """The default store (no tracking.uri, no $MLFLOW_TRACKING_URI) and relative SQLite
    files move under storage; servers and absolute paths stay as they are."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None:
        return SQLITE + os.path.join(storage, "mlflow.db")
    if uri.startswith(SQLITE) and not uri[len(SQLITE):].startswith("/"):
        return SQLITE + os.path.join(storage, uri[len(SQLITE):])
    return uri
