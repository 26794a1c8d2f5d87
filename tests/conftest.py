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

# Triton kernels run on CPU only under its interpreter, which must be on before triton is
# first imported (triton.language defines its own jit helpers at import); conftest loads
# before any test module, so every Triton test sees it.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    # 8 logical CPUs: a 4-worker job plus headroom, whatever the machine's core count.
    # The dashboard (loopback) serves the state API that Ray Train V2's cleaner polls.
    ray.init(address="local", num_cpus=8, dashboard_host="127.0.0.1", logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    try:
        yield ray
    finally:
        ray.shutdown()
