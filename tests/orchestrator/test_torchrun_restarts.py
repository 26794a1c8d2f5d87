"""`foldmoe train --launcher torchrun` with a worker SIGKILLed after a checkpoint: the
launcher tears the whole group down, starts a fresh one on a fresh rendezvous, and the job
finishes with the losses of an uninterrupted run. While it runs, every socket its
processes listen on is loopback."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from .jobs import (TINY, cli_env, job_overrides, last_per_step, process_alive, read_jsonl,
                   run_cli, set_args, wait_for)
from .sockets import listening_sockets, process_tree

pytestmark = pytest.mark.slow

STEPS, EVERY, KILL_AFTER = 12, 2, 2


def _args(tmp, data_cache) -> list[str]:
    overrides = job_overrides(tmp, data_cache, steps=STEPS, every=EVERY,
                              extra=["cluster.num_workers=2", "parallel.tp=1", "parallel.ep=2",
                                     "tracking.enabled=false"])
    return ["train", TINY, "--launcher", "torchrun", "--metrics-jsonl", "m.jsonl",
            *set_args(overrides)]


def _kill_rank1_after_checkpoint(tmp, driver_pid: int, out: dict) -> None:
    """From outside the job: record the listening sockets of the job's processes, then
    SIGKILL rank 1 once checkpoint KILL_AFTER is complete."""
    manifest = tmp / "ckpt" / f"step{KILL_AFTER:08d}" / "manifest.json"
    try:
        wait_for(manifest.exists, timeout=240, interval=0.05, what=str(manifest))
        pids = {rank: int((tmp / "runs").glob(f"*/workers/rank{rank}.pid").__next__().read_text())
                for rank in (0, 1)}
        out["listening"] = listening_sockets(process_tree(driver_pid))
        os.kill(pids[1], signal.SIGKILL)
        out["kill_time"], out["first_group"] = time.time(), pids
    except BaseException as err:  # noqa: BLE001 - reported by the test
        out["error"] = err


def test_killed_torchrun_worker_restarts_the_group_and_resumes_bit_exact(tmp_path, data_cache):
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    done = run_cli(_args(reference_dir, data_cache), cwd=reference_dir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reference = {r["step"]: r["loss"] for r in read_jsonl(reference_dir / "m.jsonl")}
    assert sorted(reference) == list(range(STEPS))

    killed_dir = tmp_path / "killed"
    killed_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *_args(killed_dir, data_cache)],
                            cwd=killed_dir, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    killed: dict = {}
    killer = threading.Thread(target=_kill_rank1_after_checkpoint,
                              args=(killed_dir, proc.pid, killed), daemon=True)
    killer.start()
    try:
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    killer.join(5)
    assert "error" not in killed, killed.get("error")
    assert proc.returncode == 0, output[-4000:]
    assert "kill_time" in killed, "the job finished before the worker could be killed"

    # The rendezvous store (the driver's), gloo's sockets (the workers'): loopback only.
    listening = killed["listening"]
    assert listening, "no listening socket seen (the rendezvous store should be one)"
    assert all(s.loopback for s in listening), [s for s in listening if not s.loopback]

    # Bit-identical: CPU fp32, same layout and world size, deterministic kernels and gloo
    # reductions; the resumed group reloads exactly the state saved at KILL_AFTER.
    records = read_jsonl(killed_dir / "m.jsonl")
    assert sorted(last_per_step(records)) == list(range(STEPS))
    assert [(r["step"], r["loss"]) for r in records if r["loss"] != reference[r["step"]]] == []
    after = [r for r in records if r["time"] > killed["kill_time"]]
    assert after and all(r["restarts"] == 1 for r in after)
    assert after[0]["step"] >= KILL_AFTER and after[0]["step"] % EVERY == 0   # a checkpoint step
    assert "worker group failed (failure 1: rank 1 (pid" in output and "killed by SIGKILL" in output
    # Nothing of the first group outlived it (rank 0 was torn down, not left orphaned).
    assert not any(map(process_alive, killed["first_group"].values()))
    print(f"\n[figures] torchrun recovery after kill (kill -> next completed step): "
          f"{after[0]['time'] - killed['kill_time']:.1f}s; resumed at step {after[0]['step']}")
