"""`ray job submit` of the driver against a real `ray start --head` on loopback (4 CPUs),
with token authentication on: a job that fits runs, with relative paths resolved under
cluster.storage_path (not in Ray's temporary copy of the working dir); a job that needs
more CPUs than the cluster has is refused by the preflight in seconds, and the submit
fails. The head is this module's own (ports and temp dir of its own), shared by its
tests, and stopped by its process group afterwards; `ray stop` would stop every Ray on
the host.

How the token flows: `ray start` and the submitting client both get RAY_AUTH_MODE=token
and RAY_AUTH_TOKEN; the job's driver inherits both from the head's environment (the job
supervisor runs it there), so `ray.init()` inside the driver authenticates without help.
"""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from .jobs import ROOT, cli_env, free_port, job_overrides, only_run, stop_process_group, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def ray_head():
    token = secrets.token_hex(16)
    dashboard = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")   # short: unix socket path limit
    ports = {f"--{name}": str(free_port()) for name in (
        "port", "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "metrics-export-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port")}
    cmd = ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=4",
           f"--temp-dir={temp_dir}", "--disable-usage-stats",
           *(f"{k}={v}" for k, v in ports.items())]
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    log = open(os.path.join(temp_dir, "head.log"), "wb")
    # No PYTHONPATH on the head: the job must find foldmoe through its --working-dir.
    head_env = {k: v for k, v in cli_env(**auth).items() if k != "PYTHONPATH"}
    proc = subprocess.Popen(cmd, env=head_env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"

    def answering():   # 401 = up, and refusing requests without the token
        if proc.poll() is not None:
            raise RuntimeError(open(os.path.join(temp_dir, "head.log")).read()[-2000:])
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            return "open"
        except urllib.error.HTTPError as err:
            return "auth" if err.code == 401 else None
        except OSError:
            return None

    try:
        state = wait_for(answering, timeout=120, interval=0.5, what="ray head")
        yield address, auth, state
    finally:
        stop_process_group(proc, grace_s=5)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(address: str, auth: dict, overrides: list[str], timeout: float = 400):
    cmd = ["ray", "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
           "python", "-m", "orchestrator.driver", "configs/tiny-moe.yaml",
           *(arg for item in overrides for arg in ("--set", item))]
    return subprocess.run(cmd, env=cli_env(**auth), capture_output=True, text=True, timeout=timeout)


def test_ray_job_submit_runs_the_driver_with_token_auth(ray_head, tmp_path, data_cache):
    address, auth, state = ray_head
    assert state == "auth"          # the dashboard refuses requests without the token
    denied = subprocess.run(["ray", "job", "list", "--address", address], env=cli_env(),
                            capture_output=True, text=True, timeout=120)
    assert denied.returncode != 0
    # A relative checkpoint.dir and the default MLflow store: both resolved under the
    # absolute cluster.storage_path, where they outlive the job's working-dir copy.
    overrides = job_overrides(tmp_path, data_cache, steps=3, every=3, extra=["checkpoint.dir=ckpt"])
    out = _submit(address, auth, overrides)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "job finished: 3 steps reported" in out.stdout
    assert (tmp_path / "runs" / "ckpt" / "step00000003" / "manifest.json").is_file()
    _, run = only_run(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    assert run.info.status == "FINISHED" and run.data.params["layout.world_size"] == "4"
    assert run.data.tags["mlflow.source.type"] == "JOB"


def test_a_job_larger_than_the_cluster_is_refused_in_seconds(ray_head, tmp_path, data_cache):
    address, auth, _ = ray_head
    overrides = job_overrides(tmp_path, data_cache, steps=3, extra=["cluster.num_workers=8"])
    start = time.monotonic()
    out = _submit(address, auth, overrides, timeout=120)
    elapsed = time.monotonic() - start
    assert out.returncode != 0, out.stdout[-3000:]            # the job is FAILED, not hanging
    assert elapsed < 60, elapsed
    # The driver's one line (Ray's CLI repeats the job's last log lines in its status message).
    line = next(l for l in out.stdout.splitlines() if l.startswith("preflight:"))
    assert line.startswith("preflight: CPU: the job needs 8 (8 workers x 1 CPU (cluster.num_workers=8, "
                           "cluster.cpus_per_worker)); the Ray cluster at ")
    assert line.endswith("has 4; set cluster.num_workers to at most 4 (with a layout that fits it), "
                         "or add CPU to the cluster")
    assert not (tmp_path / "mlflow.db").exists()              # no (empty) MLflow run
    print(f"\n[figures] ray job submit of an 8-worker job to a 4-CPU cluster: refused, "
          f"submit exited {out.returncode} after {elapsed:.1f}s")
