"""Durable paths under `ray job submit`: relative paths resolve under an absolute
cluster.storage_path; a relative storage_path is refused with the fix."""
from __future__ import annotations

import pytest

from orchestrator.config import ConfigError, load_config
from orchestrator.paths import RAY_JOB_ENV, durable_paths, in_ray_job

from .jobs import TINY


def test_outside_a_ray_job_paths_stay_as_written(monkeypatch):
    monkeypatch.delenv(RAY_JOB_ENV, raising=False)
    run = load_config(TINY)
    assert not in_ray_job() and durable_paths(run) is run


def test_relative_storage_path_is_refused_in_a_job(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        durable_paths(load_config(TINY), in_job=True)     # default storage_path: runs
    message = str(info.value)
    assert message.startswith("cluster.storage_path=runs: a relative path, and this driver runs "
                              "under `ray job submit`")
    assert str(tmp_path) in message and "set cluster.storage_path to an absolute path" in message


def test_relative_paths_resolve_under_the_storage_path(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    storage = tmp_path / "shared"
    run = durable_paths(load_config(TINY, [f"cluster.storage_path={storage}"]), in_job=True)
    assert run.checkpoint_dir == str(storage / "checkpoints" / "tiny-moe")
    assert run.schema.data.cache_dir == str(storage / "data_cache")
    assert run.schema.tracking.uri == f"sqlite:///{storage / 'mlflow.db'}"
    relative = durable_paths(load_config(TINY, [f"cluster.storage_path={storage}",
                                                "checkpoint.dir=ck/a", "tracking.uri=sqlite:///m.db"]),
                             in_job=True)
    assert relative.checkpoint_dir == str(storage / "ck" / "a")
    assert relative.schema.tracking.uri == f"sqlite:///{storage / 'm.db'}"


def test_absolute_paths_servers_and_the_environment_store_are_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    run = durable_paths(load_config(TINY, [f"cluster.storage_path={tmp_path}",
                                           f"checkpoint.dir={tmp_path / 'ck'}"]), in_job=True)
    assert run.checkpoint_dir == str(tmp_path / "ck")
    assert run.schema.tracking.uri == "http://mlflow:5000"
