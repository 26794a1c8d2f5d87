"""Runs whose driver died without ending them (SIGKILL, OOM kill, a lost node): found and
marked KILLED by the next driver that opens a run in the same MLflow experiment.

Every run a foldmoe driver opens carries its driver's identity as tags: host, pid, the
process's start time and the host's boot time (psutil), so a pid reused by another process
or a rebooted host is not mistaken for the driver. The next driver on the same host lists
the experiment's RUNNING runs, and ends each one whose driver process is gone as KILLED
with a `foldmoe.end_reason` tag. Runs of drivers on other hosts are left alone: their
liveness cannot be checked from here. The job dir gets the same identity in `driver.json`.
"""
from __future__ import annotations

import json
import os
import socket

import psutil

TAG = "foldmoe.driver."
DRIVER_FILE = "driver.json"
_START_TOLERANCE_S = 1.0


def driver_identity(pid: int | None = None) -> dict[str, str]:
    pid = os.getpid() if pid is None else pid
    return {"host": socket.gethostname(), "pid": str(pid),
            "started": f"{psutil.Process(pid).create_time():.2f}", "boot": f"{psutil.boot_time():.0f}"}


def identity_tags() -> dict[str, str]:
    return {TAG + key: value for key, value in driver_identity().items()}


def driver_alive(tags: dict[str, str]) -> bool | None:
    """True/False for a driver recorded on this host; None for another host or no record."""
    host, pid = tags.get(TAG + "host"), tags.get(TAG + "pid")
    if host != socket.gethostname() or not pid:
        return None
    if tags.get(TAG + "boot") != f"{psutil.boot_time():.0f}":
        return False                    # the host rebooted since
    try:
        process = psutil.Process(int(pid))
        started = process.create_time()
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False
    return abs(started - float(tags.get(TAG + "started", "0"))) <= _START_TOLERANCE_S


def mark_abandoned_runs(client, experiment_id: str, warn) -> list[str]:
    """Ends as KILLED every RUNNING run of the experiment whose driver (on this host) is
    gone; returns their run ids."""
    marked = []
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
                              max_results=1000)
    for run in runs:
        if driver_alive(run.data.tags) is not False:
            continue
        tags = run.data.tags
        who = f"its driver (pid {tags.get(TAG + 'pid')} on {tags.get(TAG + 'host')})"
        client.set_tag(run.info.run_id, "foldmoe.end_reason",
                       f"{who} ended without closing the run; marked KILLED by the driver "
                       f"pid {os.getpid()}")
        client.set_terminated(run.info.run_id, "KILLED")
        marked.append(run.info.run_id)
        warn(f"warning: MLflow run {run.info.run_id} ({run.info.run_name}) was still RUNNING, "
             f"but {who} is gone: marked KILLED")
    return marked


def write_driver_file(job_dir: str, run_id: str | None, tracking_uri: str | None) -> None:
    """<job_dir>/driver.json: this driver's identity and its MLflow run (for people, tools)."""
    record = {**driver_identity(), "run_id": run_id, "tracking_uri": tracking_uri}
    with open(os.path.join(job_dir, DRIVER_FILE), "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1)
