"""End-to-end jobs under `--launcher torchrun` (no Ray): MLflow on the default SQLite store
and on a real `mlflow server`, the metrics JSONL, and SIGTERM handling."""
from __future__ import annotations

import getpass
import signal
import subprocess
import sys
import urllib.request

import pytest

from engine.models.transformer import count_parameters
from orchestrator.config import load_config

from .jobs import (ROOT, TINY, artifact_names, cli_env, free_port, job_overrides, metric_steps,
                   only_run, process_alive, read_jsonl, run_cli, set_args, sigterm_after_first_step,
                   stop_process_group, wait_for)

pytestmark = pytest.mark.slow

REQUIRED_KEYS = {"step", "loss", "lm_loss", "aux_loss", "z_loss", "grad_norm", "lr", "tokens_per_s",
                 "tflops_per_device", "mfu", "step_time_s", "dropped_token_fraction",
                 "load_imbalance", "comm_bytes_ep", "comm_bytes_dp", "restarts", "memory_peak_bytes",
                 "build_peak_bytes", "param_bytes"}


def test_tiny_job_under_torchrun_logs_one_run_to_the_default_sqlite_store(tmp_path, data_cache):
    """The quick start's MLflow run (on torchrun, the same driver): params, grouped step
    metrics, source tags, system metrics, layout/plan/report artifacts; run twice, the
    second run says it is complete and opens no run."""
    steps = 4
    overrides = job_overrides(tmp_path, data_cache, steps=steps, every=2, extra=["tracking.report=true"])
    args = ["train", TINY, "--launcher", "torchrun", "--metrics-jsonl", "m.jsonl", *set_args(overrides)]
    out = run_cli(args, cwd=tmp_path, env=cli_env(MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    records = read_jsonl(tmp_path / "m.jsonl")
    assert [r["step"] for r in records] == list(range(steps))
    assert REQUIRED_KEYS <= set(records[0]), REQUIRED_KEYS - set(records[0])
    assert all(r["restarts"] == 0 and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in records)
    # Memory, max over ranks: a rank's peak RSS holds at least its parameters (~1 MB here).
    assert all(r["memory_peak_bytes"] > r["param_bytes"] > 0 and r["build_peak_bytes"] > 0
               for r in records)

    # Default store: sqlite:///mlflow.db in the working directory, exactly one run.
    assert (tmp_path / "mlflow.db").is_file()
    client, run = only_run(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert run.info.status == "FINISHED"
    params, tags = run.data.params, run.data.tags
    expected_params = count_parameters(load_config(TINY).model)
    assert params["model.preset"] == "tiny-moe" and params["parallel.ep"] == "4"
    assert (params["layout.world_size"], params["layout.tp"], params["layout.dp"],
            params["layout.ep"], params["layout.edp"]) == ("4", "2", "2", "4", "1")
    assert params["params.total"] == str(expected_params["total"])
    assert params["params.active"] == str(expected_params["active"])
    assert params["peak_flops_source"].startswith("calibrated peak")
    assert tags["foldmoe.peak_flops_kind"] == "calibrated"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert tags["mlflow.source.git.commit"] == head.stdout.strip()
    assert tags["mlflow.source.name"] == "python -m orchestrator.cli train"
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.user"] == getpass.getuser()
    assert "train" in tags["foldmoe.command"] and TINY in tags["foldmoe.command"]

    losses = metric_steps(client, run.info.run_id, "train/loss")
    assert losses == [(r["step"], r["loss"]) for r in records]
    for key in ("throughput/mfu", "throughput/tokens_per_s", "comm/bytes_ep", "comm/bytes_dp",
                "moe/load_imbalance", "moe/load_imbalance_layer_01", "moe/dropped_token_fraction",
                "cluster/restarts", "cluster/world_size", "train/grad_norm", "train/lr",
                "time/step_s", "time/forward_backward_s", "memory/peak_bytes"):
        assert len(metric_steps(client, run.info.run_id, key)) == steps, key
    assert not {"loss", "mfu", "comm_bytes_ep"} & set(run.data.metrics)     # only grouped names
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), run.data.metrics
    assert {"config.yaml", "layout.txt", "layout.json", "plan.txt", "plan.json", "report"} <= \
        artifact_names(client, run.info.run_id)
    report = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/loss.png",
            "report/expert_load.png"} <= report
    assert "job finished" in out.stdout and "job summary" in out.stdout

    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.startswith("already complete: the newest checkpoint")
    only_run(f"sqlite:///{tmp_path / 'mlflow.db'}")          # still exactly one run


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    store = tmp_path / "server"
    store.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{store / 'backend.db'}",
         "--artifacts-destination", str(store / "artifacts"), "--workers", "1"],
        cwd=store, stdout=open(store / "server.log", "wb"), stderr=subprocess.STDOUT,
        start_new_session=True)
    uri = f"http://127.0.0.1:{port}"

    def healthy():
        if proc.poll() is not None:
            raise RuntimeError((store / "server.log").read_text()[-2000:])
        try:
            return urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_for(healthy, timeout=120, interval=0.5, what="mlflow server")
        yield uri
    finally:
        stop_process_group(proc, grace_s=10)


def test_job_logs_to_a_real_mlflow_server(tmp_path, data_cache, mlflow_server):
    overrides = job_overrides(tmp_path, data_cache, steps=3, tracking_uri=mlflow_server,
                              extra=["cluster.num_workers=2", "parallel.tp=1", "parallel.ep=2",
                                     "tracking.experiment=server-test"])
    out = run_cli(["train", TINY, "--launcher", "torchrun", *set_args(overrides)], cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert not (tmp_path / "mlflow.db").exists()          # nothing went to the default store
    client, run = only_run(mlflow_server, "server-test")
    assert run.info.status == "FINISHED"
    assert run.data.params["layout.world_size"] == "2" and run.data.params["layout.ep"] == "2"
    assert [s for s, _ in metric_steps(client, run.info.run_id, "train/loss")] == [0, 1, 2]
    assert {"config.yaml", "layout.txt"} <= artifact_names(client, run.info.run_id)


def test_sigterm_stops_the_job_within_3s_and_marks_the_run_killed(tmp_path, data_cache):
    # `ray job stop` gives 3 s: the workers get a grace of 1.5 s to save the step in progress
    # (best effort; the save itself is tested in test_preemption.py), then they are killed.
    overrides = job_overrides(tmp_path, data_cache, steps=10_000,
                              extra=["cluster.num_workers=2", "parallel.tp=1", "parallel.ep=2",
                                     "checkpoint.preempt_grace_s=1.5"])
    rc, elapsed, worker_pids, output = sigterm_after_first_step(
        ["train", TINY, "--launcher", "torchrun", "--metrics-jsonl", "m.jsonl", *set_args(overrides)],
        tmp_path, cli_env())
    assert rc == 128 + signal.SIGTERM, output[-3000:]
    assert elapsed < 3.0, elapsed
    assert len(worker_pids) == 2

    wait_for(lambda: not any(map(process_alive, worker_pids)), timeout=5,
             what="torchrun workers to exit")
    _, run = only_run(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert run.info.status == "KILLED"
