"""At the end of a run: render the review report from the MLflow run itself and log it as
the run's `report/` artifacts (plots as PNG, report.md linking them, report.html).

The report runs as `python -m dashboards.report RUN_ID --out-dir ...` in a subprocess:
the very command a user runs (so the path the tests exercise is the user's), matplotlib
stays out of the driver, and the driver remains the only process writing to MLflow.
"""
from __future__ import annotations

import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT_TIMEOUT_S = 180


def report_command(run_id: str, tracking_uri: str, out_dir: str) -> list[str]:
    return [sys.executable, "-m", "dashboards.report", run_id, "--tracking-uri", tracking_uri,
            "--out-dir", out_dir]


def log_report(tracker, job_dir: str, warn) -> str | None:
    """Renders into <job_dir>/report and logs it; returns the directory, or None (warned)."""
    out_dir = os.path.join(job_dir, "report")
    env = dict(os.environ, MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    try:
        done = subprocess.run(report_command(tracker.run_id, tracker.uri, out_dir), env=env,
                              capture_output=True, text=True, timeout=REPORT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        warn(f"warning: the run's report was not rendered ({type(err).__name__}: {err})")
        return None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        warn(f"warning: the run's report was not rendered ({last})")
        return None
    tracker.log_artifacts(out_dir, "report")
    return out_dir
