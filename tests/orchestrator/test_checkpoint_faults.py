"""Faults through the public CLI (torchrun launcher): a driver SIGKILLed mid-run leaves its
MLflow run RUNNING until the next driver on the experiment marks it KILLED; that next
driver resumes although the newest checkpoint has a flipped byte in rank 1's shard and the
one before a truncated shard: both are moved to quarantine/ with a warning, the third
newest is loaded on every rank, and the re-run steps equal the killed run's losses."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from .jobs import (TINY, cli_env, job_overrides, only_run, process_alive, read_jsonl, run_cli,
                   set_args, wait_for)

pytestmark = pytest.mark.slow


def _checkpoint_steps(ckpt) -> list[int]:
    return sorted(int(p.name[4:]) for p in ckpt.glob("step*") if (p / "manifest.json").exists())


def _kill_driver_and_workers(proc, tmp) -> None:
    """SIGKILL the driver (nothing of it runs on), then torchrun's process group."""
    worker_pids = [int(p.read_text()) for p in (tmp / "runs").glob("*/workers/rank*.pid")]
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    for pgid in {os.getpgid(pid) for pid in worker_pids if process_alive(pid)}:
        os.killpg(pgid, signal.SIGKILL)
    wait_for(lambda: not any(map(process_alive, worker_pids)), timeout=15, what="workers to exit")


def test_killed_driver_is_marked_killed_and_a_corrupt_newest_checkpoint_falls_back(tmp_path, data_cache):
    common = ["cluster.num_workers=2", "parallel.tp=1", "parallel.ep=2", "checkpoint.keep=5"]
    args = ["train", TINY, "--launcher", "torchrun"]
    first = job_overrides(tmp_path, data_cache, steps=10_000, every=1, extra=common)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args, "--metrics-jsonl",
                             "m1.jsonl", *set_args(first)], cwd=tmp_path, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(_checkpoint_steps(tmp_path / "ckpt")) >= 3, timeout=240,
                 what="three checkpoints")
    finally:
        _kill_driver_and_workers(proc, tmp_path)
    _, killed = only_run(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert killed.info.status == "RUNNING"          # nobody ended it

    ckpt = tmp_path / "ckpt"
    *_, third, second, newest = _checkpoint_steps(ckpt)
    flipped = ckpt / f"step{newest:08d}" / "rank00001.safetensors"    # read by rank 1 only
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x10
    flipped.write_bytes(bytes(data))
    truncated = ckpt / f"step{second:08d}" / "rank00000.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-100])

    started = time.monotonic()
    again = job_overrides(tmp_path, data_cache, steps=newest + 1, every=1, extra=common)
    out = run_cli([*args, "--metrics-jsonl", "m2.jsonl", *set_args(again)], cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert f"{flipped}: SHA-256 mismatch" in text and "found by rank 1" in text
    assert f"{truncated}: " in text and "truncated" in text
    assert sorted(p.name for p in (ckpt / "quarantine").iterdir()) == [
        f"step{second:08d}.truncated", f"step{newest:08d}.sha256-mismatch"]
    assert f"resumed at step {third}" in out.stdout

    # The re-run steps are those of the killed run, bit for bit (same layout, CPU fp32).
    before = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "m1.jsonl")}
    after = read_jsonl(tmp_path / "m2.jsonl")
    assert [r["step"] for r in after] == list(range(third, newest + 1))
    assert [r["loss"] for r in after if r["step"] in before] == [before[r["step"]] for r in after
                                                                  if r["step"] in before]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    marked = client.get_run(killed.info.run_id)
    assert marked.info.status == "KILLED"
    assert "ended without closing the run" in marked.data.tags["foldmoe.end_reason"]
    assert f"MLflow run {killed.info.run_id}" in out.stderr and "marked KILLED" in out.stderr
    print(f"\n[figures] resume after two corrupt checkpoints: {time.monotonic() - started:.1f}s "
          f"for the second job ({newest + 1 - third} steps from step {third})")

    # Every checkpoint left corrupt where only the ranks look (a tensor file's bytes): the
    # workers walk back through all of them and the driver ends the job after that one
    # attempt, with one line, instead of the launcher retrying the same load.
    for shard in ckpt.glob("step*/rank00001.safetensors"):
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x10
        shard.write_bytes(bytes(data))
    started = time.monotonic()
    last = run_cli([*args, *set_args(job_overrides(tmp_path, data_cache, steps=newest + 2, every=1,
                                                    extra=common))], cwd=tmp_path)
    elapsed = time.monotonic() - started
    assert last.returncode == 1, last.stdout[-3000:] + last.stderr[-3000:]
    (error,) = [line for line in last.stderr.splitlines() if line.startswith("error: ")]
    assert error.startswith(f"error: checkpoint.dir={ckpt}: no checkpoint verifies (step")
    assert not list(ckpt.glob("step*")) and "--no-resume" in error
    job_dir = max((tmp_path / "runs").iterdir(), key=os.path.getmtime)
    assert [e["type"] for e in read_jsonl(job_dir / "events.jsonl")].count("placed") == 1
    assert client.get_run(only_failed(client)).info.status == "FAILED"
    print(f"[figures] no checkpoint verifies: the job failed after one attempt in {elapsed:.1f}s")


def only_failed(client) -> str:
    exp = client.get_experiment_by_name("foldmoe")
    (run,) = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FAILED'")
    return run.info.run_id
