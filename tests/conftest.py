"""Shared fixtures.

`ray_cluster`: one embedded local Ray per test session (ray.init costs seconds; every Ray
test shares it). address="local" so it never joins a `ray start` cluster that another
test (or user) runs on this machine. Tests that need a real head node start their own.
"""
from __future__ import annotations

import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    # 8 logical CPUs: a 4-worker job plus headroom, whatever the machine's core count.
    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    try:
        yield ray
    finally:
        ray.shutdown()
