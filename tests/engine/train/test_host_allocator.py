"""The CPU worker's glibc settings: the pages of a step's freed large tensors are reused,
not faulted in again (engine/train/host_allocator.py). Each case runs in a fresh
interpreter, because the settings are process-wide."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc settings")

PROBE = """
import json, resource, torch
from engine.train.host_allocator import retain_freed_host_memory
status = retain_freed_host_memory()
assert retain_freed_host_memory() == status          # idempotent
MIB = 1 << 20

def faults_of_one_step():
    # A step's large temporaries (above glibc's 32 MiB mmap cap), allocated, written, freed.
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    grads = [torch.empty(n * MIB // 4).fill_(1.0) for n in (64, 48, 64)]
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del grads
    return faults

for _ in range(6):                                  # the heap settles (glibc reuses, coalesces)
    faults_of_one_step()
print(json.dumps({"status": status, "faults": faults_of_one_step(), "pages": 176 * MIB // 4096}))
"""


def _probe(**env) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    full_env.pop("FOLDMOE_HOST_MALLOC", None)
    full_env.update(PYTHONPATH=root, **env)
    out = subprocess.run([sys.executable, "-c", PROBE], env=full_env, capture_output=True,
                         text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_large_tensors_are_reused_without_page_faults():
    result = _probe()
    assert result["status"].startswith("glibc keeps freed blocks"), result
    assert result["faults"] < 0.05 * result["pages"], result


def test_default_glibc_faults_every_page_in_again():
    """The cost the settings remove (and the switch that turns them off)."""
    result = _probe(FOLDMOE_HOST_MALLOC="default")
    assert result["status"] == "left to the user (FOLDMOE_HOST_MALLOC=default)"
    assert result["faults"] > 0.5 * result["pages"], result


def test_users_own_glibc_settings_are_left_alone():
    result = _probe(MALLOC_MMAP_THRESHOLD_="131072")
    assert result["status"] == "left to the user (MALLOC_MMAP_THRESHOLD_)"
