"""The quick-start path on the embedded local Ray (`foldmoe train`, no address): while the
job runs, every socket its processes listen on is loopback, and every Ray worker process
that runs foldmoe or Ray Train code is pinned to this job's own GCS (RAY_ADDRESS), so it
can never look up another Ray on the host. The torchrun side is checked in
test_torchrun_restarts.py, during its kill test."""
from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

from .jobs import TINY, cli_env, job_overrides, read_jsonl, set_args, wait_for
from .sockets import listening_sockets, process_tree

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _ray_address_of(proc: psutil.Process) -> str | None:
    try:
        return proc.environ().get("RAY_ADDRESS")
    except psutil.Error:
        return None


def test_embedded_ray_job_listens_on_loopback_only_and_is_pinned_to_its_gcs(tmp_path, data_cache):
    overrides = job_overrides(tmp_path, data_cache, steps=12,   # still running when inspected
                              extra=["cluster.num_workers=2", "parallel.tp=1", "parallel.ep=2",
                                     "tracking.enabled=false"])
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "train", TINY,
                             "--metrics-jsonl", "m.jsonl", *set_args(overrides)],
                            cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: read_jsonl(tmp_path / "m.jsonl") or proc.poll() is not None,
                 timeout=300, interval=0.2, what="the first step")
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        tree = process_tree(proc.pid)
        listening = listening_sockets(tree)
        ray_workers = [p for p in tree if any(name in " ".join(p.cmdline()) for name in
                                              ("TrainController", "PlacementGroupCleaner",
                                               "RayTrainWorker"))]
        pins = {p.pid: _ray_address_of(p) for p in ray_workers}
        gcs_ports = {s.port for s in listening if "gcs_server" in s.command}
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-4000:]

    # GCS, raylet, object manager, core workers, dashboard and its agent, the runtime-env
    # agent, the Prometheus endpoint, Ray Train's gloo store: none beyond loopback.
    assert len(listening) >= 8, listening
    assert [s for s in listening if not s.loopback] == []
    # The controller, its placement-group cleaner and both training workers, each naming
    # this job's GCS (the cleaner's state-API lookups once found another Ray on the host).
    assert len(ray_workers) >= 3, [" ".join(p.cmdline()) for p in tree]
    assert len(gcs_ports) == 1, listening
    assert set(pins.values()) == {f"127.0.0.1:{gcs_ports.pop()}"}, pins
