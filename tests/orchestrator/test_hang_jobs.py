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
import threading
import time

import pytest

from .jobs import TINY, cli_env, job_overrides, process_alive, read_jsonl, set_args, wait_for

pytestmark = pytest.mark.slow

HANG_TIMEOUT_S = 5


def stop_a_worker_mid_training(args: list[str], cwd, rank: int):
    """Starts the CLI, SIGSTOPs `rank` once its heartbeat has published a step; returns
    (rc, seconds from SIGSTOP to the hang line, to the driver's exit, the group's worker
    pids, output)."""
    proc = subprocess.Popen([sys.executable, "-u", "-m", "orchestrator.cli", *args], cwd=cwd,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), line)
                                                           for line in proc.stdout), daemon=True)
    reader.start()
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
        rc = proc.wait(8 * HANG_TIMEOUT_S)
        ended = time.monotonic() - sent
        reader.join(5)
    finally:
        if proc.poll() is None:
            proc.kill()
        if stopped is not None and process_alive(stopped):
            os.kill(stopped, signal.SIGKILL)
    named = [t - sent for t, line in lines if "stopped in" in line]
    return rc, (named[0] if named else None), ended, pids, "".join(line for _, line in lines)


def test_sigstopped_torchrun_worker_is_named_and_the_job_ends(tmp_path, data_cache):
    overrides = job_overrides(tmp_path, data_cache, steps=400, extra=[
        "cluster.num_workers=2", "parallel.tp=1", "parallel.ep=2", "cluster.max_failures=0",
        f"cluster.hang_timeout_s={HANG_TIMEOUT_S}", "tracking.enabled=false"])
    args = ["train", TINY, "--launcher", "torchrun", "--metrics-jsonl", "m.jsonl", *set_args(overrides)]
    rc, named_s, ended_s, pids, output = stop_a_worker_mid_training(args, tmp_path, rank=1)
    assert rc != 0, output[-3000:]
    # one warning when it happens; the job's error repeats it as the cause
    lines = [line for line in output.splitlines() if "stopped in" in line]
    assert [line.split(":")[0] for line in lines] == ["warning", "error"], output[-3000:]
    host = socket.gethostname()
    assert f"rank 1 on {host} stopped in " in lines[0] and "no heartbeat for" in lines[0], lines
    assert f"cluster.hang_timeout_s={HANG_TIMEOUT_S}" in lines[0], lines
    events = [json.loads(s) for s in (next((tmp_path / "runs").glob("*/faults.jsonl"))
                                      .read_text().splitlines())]
    (fault,) = [e for e in events if e["type"] == "hang"]   # (a loaded machine may add stragglers)
    assert fault["type"] == "hang" and fault["rank"] == 1 and fault["host"] == host
    assert f"stopped in {fault['phase']} " in lines[0] and fault["step"] >= 1
    print(f"torchrun: SIGSTOP -> hang named {named_s:.1f} s, driver exit {ended_s:.1f} s "
          f"(hang_timeout_s={HANG_TIMEOUT_S})")
    # named after the timeout + one beat (1 s) + one read (0.5 s); the rest of the job's end
    # is torchrun's teardown of the group and the driver's summary
    assert HANG_TIMEOUT_S < named_s < HANG_TIMEOUT_S + 3, (named_s, output[-3000:])
    assert ended_s < 2 * HANG_TIMEOUT_S + 10, (ended_s, output[-3000:])
    # no orphans: the stopped rank and its peers are gone
    wait_for(lambda: not any(map(process_alive, pids)), timeout=10, what="workers to exit")
