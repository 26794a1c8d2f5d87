"""Shared fixtures.

`ray_cluster`: one embedded local Ray per test session (ray.init costs seconds; every Ray
test shares it), started as the driver starts its own (orchestrator/local_ray.py): it
never joins a `ray start` cluster that another test (or user) runs on this machine.
Tests that need a real head node start their own.
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


_GCS_ADDRESS: list[str] = []


@pytest.fixture(scope="session")
def ray_gcs_address(ray_cluster) -> str:
    """Where the session Ray's GCS listens (127.0.0.1:port): its runtime context reports the
    host's address, on which the loopback-only GCS does not answer."""
    return _GCS_ADDRESS[-1]


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from orchestrator.local_ray import start_local_ray

    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    # 8 logical CPUs: a 4-worker job plus headroom, whatever the machine's core count.
    # The same embedded Ray as the driver's: loopback only, its processes pinned to it.
    _GCS_ADDRESS.append(start_local_ray(8, {"PYTHONPATH": pythonpath}, logging_level="WARNING",
                                        log_to_driver=True))
    try:
        yield ray
    finally:
        ray.shutdown()
