"""Ray Train V2 jobs on the session's local Ray: the tiny config on 4 CPU workers (its Ray
metrics scraped from the node's Prometheus endpoint while it runs, and checked against
the Grafana dashboard), and workers stopped and killed from outside mid-run that must resume
to bit-identical losses.

The driver runs in-process (the test is the driver), exactly as `foldmoe train` does."""
from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import urllib.request

import pytest

from orchestrator.config import load_config
from orchestrator.driver import run_training

from .jobs import (ROOT, TINY, cli_env, job_overrides, last_per_step, metric_steps, only_run,
                   process_alive, read_jsonl, set_args, sigterm_after_first_step, wait_for)

pytestmark = [pytest.mark.slow, pytest.mark.ray]

GRAFANA = ROOT / "dashboards" / "grafana_foldmoe.json"

STEPS, EVERY = 10, 3


def _run_ray_job(tmp, data_cache, **kwargs):
    overrides = job_overrides(tmp, data_cache, steps=STEPS, every=EVERY,
                              tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    run = load_config(TINY, overrides)
    result = run_training(run, launcher="ray", metrics_jsonl=str(tmp / "m.jsonl"),
                          live_progress=False, **kwargs)
    return result, read_jsonl(tmp / "m.jsonl")


class MetricsScraper(threading.Thread):
    """Polls the node's Prometheus endpoint; keeps the foldmoe metric names it has seen."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.url, self.seen, self.done = f"http://127.0.0.1:{port}/metrics", set(), threading.Event()

    def scrape(self) -> None:
        try:
            text = urllib.request.urlopen(self.url, timeout=5).read().decode()
        except OSError:
            return
        self.seen |= {line.split("{")[0].split(" ")[0] for line in text.splitlines()
                      if line.startswith("ray_foldmoe_")}

    def run(self) -> None:
        while not self.done.wait(1.0):
            self.scrape()


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tmp_path_factory, data_cache):
    tmp = tmp_path_factory.mktemp("ray_uninterrupted")
    scraper = MetricsScraper(ray_cluster.nodes()[0]["MetricsExportPort"])
    scraper.start()
    started = time.time()
    result, records = _run_ray_job(tmp, data_cache)
    print(f"\n[figures] ray tiny job (4 CPU workers, {STEPS} steps): time to first step "
          f"{result.summary['time_to_first_step_s']:.1f}s, job {time.time() - started:.1f}s")
    # Ray's metrics agent exports every ~10 s; the last samples may land after the job.
    wanted = _grafana_metric_names()
    deadline = time.monotonic() + 30
    while not wanted <= scraper.seen and time.monotonic() < deadline:
        time.sleep(1.0)
    scraper.done.set()
    return tmp, result, records, scraper.seen


def _grafana_metric_names() -> set[str]:
    doc = json.loads(GRAFANA.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in doc["templating"]["list"] if v["type"] == "query"]
    return {name for expr in exprs for name in re.findall(r"\bray_foldmoe_\w+", expr)}


def test_grafana_queries_name_metrics_the_running_job_exports(uninterrupted):
    *_, seen = uninterrupted
    wanted = _grafana_metric_names()
    assert len(wanted) >= 6
    assert wanted <= seen, wanted - seen


def test_tiny_config_on_4_ray_train_workers(uninterrupted):
    tmp, result, records, _ = uninterrupted
    assert result.rc == 0, result.error
    assert [r["step"] for r in records] == list(range(STEPS))
    assert all(r["restarts"] == 0 for r in records)
    client, run = only_run(f"sqlite:///{tmp / 'mlflow.db'}")
    assert run.info.status == "FINISHED" and run.info.run_id == result.run_id
    assert run.data.params["layout.world_size"] == "4"
    assert metric_steps(client, run.info.run_id, "train/loss") == [(r["step"], r["loss"]) for r in records]
    # The worker pid files name 4 distinct processes: one Ray Train worker per rank.
    pids = {p.read_text() for p in (tmp / "runs").glob("*/workers/rank*.pid")}
    assert len(pids) == 4


def _pid_of(tmp, rank: int) -> int:
    (pid_file,) = list((tmp / "runs").glob(f"*/workers/rank{rank}.pid"))
    pid = int(pid_file.read_text())
    assert pid != os.getpid()
    return pid


def _sigterm_then_sigkill(tmp, out: dict) -> None:
    """From outside the job: SIGTERM rank 2 (a preempted node, an evicted pod) once a step is
    reported; once the next group runs and has written its next periodic checkpoint, SIGKILL
    rank 1 (a crash: nothing saved beyond that checkpoint)."""
    events = lambda: read_jsonl(next((tmp / "runs").glob("*/events.jsonl"), tmp / "none"))  # noqa: E731
    try:
        wait_for(lambda: read_jsonl(tmp / "m.jsonl"), timeout=300, what="the first step")
        os.kill(_pid_of(tmp, 2), signal.SIGTERM)
        out["signal_time"] = time.time()
        starts = wait_for(lambda: [e for e in events() if e["type"] == "start"][1:], timeout=300,
                          what="the second worker group")
        target = (starts[0]["resumed_from_step"] // EVERY + 1) * EVERY
        assert target < STEPS - 1, f"the preemption saved step {starts[0]['resumed_from_step']}: too late"
        manifest = tmp / "ckpt" / f"step{target:08d}" / "manifest.json"
        wait_for(manifest.exists, timeout=300, what=str(manifest))
        os.kill(_pid_of(tmp, 1), signal.SIGKILL)
        out["kill_time"], out["target"] = time.time(), target
    except BaseException as err:  # noqa: BLE001 - reported by the test
        out["error"] = err


def test_sigterm_then_sigkill_to_ray_workers_resume_bit_exact(uninterrupted, tmp_path, data_cache):
    """One job, two disruptions, each answered by a new worker group:
    - SIGTERM to a worker: Ray Train runs the loop in a thread, so the handler installed on
      the worker actor's main thread (orchestrator/ray_callbacks.py PreemptionHandlers) turns
      it into the stop vote; every rank saves that step, and the next group resumes there,
      not at the newest periodic checkpoint (every 3 steps);
    - SIGKILL to another worker of that group after its next periodic checkpoint: Ray Train
      restarts the group (FailureConfig), which resumes at that checkpoint.
    Every step then equals the uninterrupted run's loss exactly, and the restarts are
    counted once each, in the summary, MLflow and the controller's events."""
    _, reference_result, reference, _ = uninterrupted
    assert reference_result.rc == 0
    disrupted: dict = {}
    thread = threading.Thread(target=_sigterm_then_sigkill, args=(tmp_path, disrupted), daemon=True)
    thread.start()
    result, records = _run_ray_job(tmp_path, data_cache)
    thread.join(5)
    assert "error" not in disrupted, disrupted.get("error")
    assert result.rc == 0, result.error
    assert "kill_time" in disrupted, "the job finished before the worker could be killed"

    events = read_jsonl(next((tmp_path / "runs").glob("*/events.jsonl")))
    (preempted,) = [e for e in events if e["type"] == "step" and e.get("preempted")]
    saved_at = preempted["step"] + 1
    starts = [e["resumed_from_step"] for e in events if e["type"] == "start"]
    assert starts == [None, saved_at, disrupted["target"]], (starts, saved_at, disrupted)

    # CPU fp32, same layout: deterministic kernels and gloo reductions, so every step
    # reported (re-run ones too) equals the uninterrupted run's loss exactly.
    expected = {r["step"]: r["loss"] for r in reference}
    assert sorted(last_per_step(records)) == list(range(STEPS))
    assert [(r["step"], r["loss"]) for r in records if r["loss"] != expected[r["step"]]] == []
    after = [r for r in records if r["time"] > disrupted["kill_time"]]
    assert after and all(r["restarts"] == 2 for r in after)

    client, run = only_run(f"sqlite:///{tmp_path / 'mlflow.db'}")   # the same single run
    assert run.info.status == "FINISHED"
    # Honest accounting: restarts = worker-group starts - 1 (the controller saw each start).
    summary = result.summary
    assert (summary["restarts"], summary["group_starts"], summary["failures"]) == (2, 3, 2), summary
    assert metric_steps(client, run.info.run_id, "job/restarts") == [(0, 2)]
    assert max(v for _, v in metric_steps(client, run.info.run_id, "cluster/restarts")) == 2
    controller = read_jsonl(next((tmp_path / "runs").glob("*/controller.jsonl")))
    assert [e["group"] for e in controller if e["type"] == "group_start"] == [1, 2, 3]
    print(f"\n[figures] ray worker SIGTERM at step {preempted['step']}: saved step {saved_at} in "
          f"{preempted['checkpoint_stall_s']:.2f}s, resumed there; SIGKILL after step "
          f"{disrupted['target']}: kill -> next completed step {after[0]['time'] - disrupted['kill_time']:.1f}s")


def test_sigterm_to_a_driver_connected_by_ray_address(ray_gcs_address, tmp_path, data_cache):
    """`foldmoe train` with RAY_ADDRESS joins the running cluster (shipping its code as
    py_modules); SIGTERM (what `ray job stop` sends) ends it within 3 s with the MLflow run
    KILLED, and Ray then reaps the controller and workers the driver owned."""
    # A grace of 1.5 s (within `ray job stop`'s 3 s) for the workers' save of the step
    # (best effort; the driver's side is tested in test_stop_save.py).
    overrides = job_overrides(tmp_path, data_cache, steps=10_000,
                              extra=["cluster.num_workers=2", "parallel.tp=1", "parallel.ep=2",
                                     "checkpoint.preempt_grace_s=1.5"])
    address = ray_gcs_address
    rc, elapsed, worker_pids, output = sigterm_after_first_step(
        ["train", TINY, "--metrics-jsonl", "m.jsonl", *set_args(overrides)], tmp_path,
        cli_env(RAY_ADDRESS=address))
    assert rc == 128 + signal.SIGTERM, output[-3000:]
    assert elapsed < 3.0, elapsed
    assert len(worker_pids) == 2
    wait_for(lambda: not any(map(process_alive, worker_pids)), timeout=30, what="Ray workers to exit")
    _, run = only_run(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert run.info.status == "KILLED"
