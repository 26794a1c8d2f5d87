"""Fault injection through the public CLI: a SIGSTOPped worker is named by the driver's
watchdog (rank, host, phase, axes) and the job ends within about twice
cluster.hang_timeout_s, leaving no worker process behind."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from .jobs import TINY, cli_env, job_overrides, process_alive, read_jsonl, set_args, wait_for

pytestmark = pytest.mark.slow

HANG_TIMEOUT_S = 5


def stop_a_worker_after_first_step(args: list[str], cwd, rank: int):
    """Starts the CLI, SIGSTOPs `rank` once a step is reported; returns (rc, seconds from
    SIGSTOP to the driver's exit, the first group's worker pids, output)."""
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    stopped = None
    try:
        wait_for(lambda: read_jsonl(cwd / "m.jsonl"), timeout=240, what="the first step")
        pid_files = sorted((cwd / "runs").glob("*/workers/rank*.pid"))
        pids = [int(p.read_text()) for p in pid_files]
        stopped = int((pid_files[0].parent / f"rank{rank}.pid").read_text())
        # Mid-training: its heartbeat has published a step (beats come once a second).
        beat = pid_files[0].parent / f"rank{rank}.heartbeat.json"
        wait_for(lambda: (json.loads(beat.read_text()).get("step") or 0) >= 1, timeout=60,
                 what="a heartbeat with a step")
        os.kill(stopped, signal.SIGSTOP)
        sent = time.monotonic()
        rc = proc.wait(6 * HANG_TIMEOUT_S)
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
        if stopped is not None and process_alive(stopped):
            os.kill(stopped, signal.SIGKILL)
    return rc, elapsed, pids, proc.stdout.read().decode(errors="replace")


def test_sigstopped_torchrun_worker_is_named_and_the_job_ends(tmp_path, data_cache):
    overrides = job_overrides(tmp_path, data_cache, steps=400, extra=[
        "cluster.num_workers=2", "parallel.tp=1", "parallel.ep=2", "cluster.max_failures=0",
        f"cluster.hang_timeout_s={HANG_TIMEOUT_S}", "tracking.enabled=false"])
    args = ["train", TINY, "--launcher", "torchrun", "--metrics-jsonl", "m.jsonl", *set_args(overrides)]
    rc, elapsed, pids, output = stop_a_worker_after_first_step(args, tmp_path, rank=1)
    assert rc != 0, output[-3000:]
    lines = [line for line in output.splitlines() if "rank 1 on" in line and "stopped in" in line]
    assert len(lines) == 1, output[-3000:]
    host = socket.gethostname()
    assert f"rank 1 on {host} stopped in " in lines[0] and "no heartbeat for" in lines[0], lines
    assert f"cluster.hang_timeout_s={HANG_TIMEOUT_S}" in lines[0], lines
    (faults,) = [json.loads(s) for s in (next((tmp_path / "runs").glob("*/faults.jsonl"))
                                         .read_text().splitlines())]
    assert faults["type"] == "hang" and faults["rank"] == 1 and faults["host"] == host
    assert faults["phase"] in lines[0] and faults["step"] is not None
    print(f"torchrun: SIGSTOP -> job exit {elapsed:.1f} s (hang_timeout_s={HANG_TIMEOUT_S})")
    assert elapsed < 2 * HANG_TIMEOUT_S + 4, (elapsed, output[-3000:])
    wait_for(lambda: not any(map(process_alive, pids)), timeout=10, what="workers to exit")
