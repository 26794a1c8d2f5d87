"""Preemption through the public CLI (torchrun launcher): SIGTERM to one worker mid-run makes
both ranks save the step in progress and exit; torchrun restarts the group, which resumes at
that step (not at a periodic checkpoint: there is none before the end) and finishes with the
losses of an uninterrupted run (bit-exact: same layout, deterministic CPU kernels)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from .jobs import TINY, cli_env, job_overrides, read_jsonl, run_cli, set_args, wait_for

pytestmark = pytest.mark.slow

STEPS = 10


def _args(tmp, data_cache) -> list[str]:
    overrides = job_overrides(tmp, data_cache, steps=STEPS, every=1000, extra=[
        "cluster.num_workers=2", "parallel.tp=1", "parallel.ep=2", "tracking.enabled=false"])
    return ["train", TINY, "--launcher", "torchrun", "--metrics-jsonl", "m.jsonl", *set_args(overrides)]


def test_sigterm_to_one_worker_saves_the_step_in_progress_and_the_job_resumes_there(tmp_path, data_cache):
    (tmp_path / "whole").mkdir()
    out = run_cli(_args(tmp_path / "whole", data_cache), cwd=tmp_path / "whole")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    want = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "whole" / "m.jsonl")}

    cwd = tmp_path / "preempted"
    cwd.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *_args(cwd, data_cache)],
                            cwd=cwd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: len(read_jsonl(cwd / "m.jsonl")) >= 2, timeout=240, what="two steps")
        (pid_file,) = (cwd / "runs").glob("*/workers/rank1.pid")
        os.kill(int(pid_file.read_text()), signal.SIGTERM)
        rc = proc.wait(240)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = proc.stdout.read().decode(errors="replace")
    assert rc == 0, output[-3000:]

    (events_path,) = (cwd / "runs").glob("*/events.jsonl")
    events = read_jsonl(events_path)
    starts = [e for e in events if e["type"] == "start"]
    (preempted,) = [e for e in events if e["type"] == "step" and e.get("preempted")]
    saved_at = preempted["step"] + 1
    assert preempted["checkpointed"] and 2 <= saved_at < STEPS, preempted
    assert [s["resumed_from_step"] for s in starts] == [None, saved_at]
    steps = [e["step"] for e in events if e["type"] == "step"]
    assert steps == list(range(STEPS)), steps         # no step lost, none repeated
    assert (cwd / "ckpt" / f"step{saved_at:08d}").is_dir()   # keep=2: it and the final one
    got = {r["step"]: r["loss"] for r in read_jsonl(cwd / "m.jsonl")}
    assert got == want
    print(f"\n[figures] preempted at step {preempted['step']}, saved step {saved_at} in "
          f"{preempted['checkpoint_stall_s']:.2f}s; resumed there; {STEPS} losses equal")
