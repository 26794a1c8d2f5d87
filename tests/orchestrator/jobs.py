"""Helpers for the end-to-end job tests: small overrides, subprocess CLI, MLflow queries."""
from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny-moe.yaml")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def job_overrides(tmp: pathlib.Path, data_cache: pathlib.Path, *, steps: int,
                  every: int = 0, tracking_uri: str | None = None, extra=()) -> list[str]:
    """The tiny config, shortened: seq 32, 4 sequences per step, paths under tmp."""
    sets = [f"train.steps={steps}", "train.seq_len=32", "train.global_batch_size=4",
            "train.micro_batch_size=1", "train.warmup_steps=1",
            f"checkpoint.every_steps={every}", f"checkpoint.dir={tmp / 'ckpt'}",
            f"cluster.storage_path={tmp / 'runs'}", f"data.cache_dir={data_cache}",
            "cluster.max_failures=2", "cluster.collective_timeout_s=120",
            "tracking.report=false"]   # rendered and checked by the quick-start test only
    if tracking_uri:
        sets.append(f"tracking.uri={tracking_uri}")
    return sets + list(extra)


def set_args(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def run_cli(args: list[str], cwd: pathlib.Path, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd,
                          env=env or cli_env(), capture_output=True, text=True, timeout=timeout)


def read_jsonl(path: pathlib.Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_per_step(records: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in records}


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def only_run(uri: str, experiment: str = "foldmoe"):
    """The single MLflow run of the experiment (asserts there is exactly one)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} at {uri}"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def metric_steps(client, run_id: str, key: str) -> list[tuple[int, float]]:
    history = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step))
    return [(m.step, m.value) for m in history]


def artifact_names(client, run_id: str) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id)}


def process_alive(pid: int) -> bool:
    """True for a live process (a zombie awaiting its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"
    except OSError:
        return False


def sigterm_after_first_step(args: list[str], cwd: pathlib.Path, env: dict[str, str]):
    """Starts the CLI, sends SIGTERM once a step is reported (what `ray job stop` does);
    returns (exit code, seconds from signal to exit, worker pids, output)."""
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: read_jsonl(cwd / "m.jsonl"), timeout=240, what="the first step")
        worker_pids = [int(p.read_text()) for p in (cwd / "runs").glob("*/workers/rank*.pid")]
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(10)
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    return rc, elapsed, worker_pids, proc.stdout.read().decode(errors="replace")


def stop_process_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the process group of a server a test started; SIGKILL it after grace_s."""
    import signal

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(15)
