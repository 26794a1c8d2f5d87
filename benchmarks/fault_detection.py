"""Hang detection and recovery time through the public CLI: `foldmoe train` on tiny-moe with
2 workers (tp1, ep2), one worker SIGSTOPped mid-training, on each launcher.

Times are seconds after the SIGSTOP, read from the driver's own output lines as they
arrive: the watchdog's hang line, the launcher's group failure, the first step of the new
group (Ray, cluster.max_failures=1) and the driver's exit. torchrun runs with
max_failures=0: its in-place restart is the subject of issue 15 item 2.

    python -m benchmarks.fault_detection [--launchers torchrun ray] [--hang-timeout 5] [--rounds 1]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time

from benchmarks.common import median, print_table, write_json

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _overrides(tmp: str, launcher: str, hang_timeout: float, data_cache: str) -> list[str]:
    sets = ["train.steps=60", "train.seq_len=32", "train.global_batch_size=4",
            "train.micro_batch_size=1", "cluster.num_workers=2", "parallel.tp=1", "parallel.ep=2",
            f"cluster.max_failures={1 if launcher == 'ray' else 0}",
            f"cluster.hang_timeout_s={hang_timeout}", "tracking.enabled=false",
            "checkpoint.every_steps=2", f"checkpoint.dir={tmp}/ckpt",
            f"cluster.storage_path={tmp}/runs", f"data.cache_dir={data_cache}"]
    return [arg for s in sets for arg in ("--set", s)]


def _rank_step(tmp: str, rank: int) -> int:
    for path in glob.glob(f"{tmp}/runs/*/workers/rank{rank}.heartbeat.json"):
        try:
            with open(path, encoding="utf-8") as handle:
                return json.load(handle).get("step") or 0
        except (OSError, ValueError):
            pass
    return -1


def one_round(launcher: str, hang_timeout: float, data_cache: str) -> dict:
    tmp = tempfile.mkdtemp(prefix="fault-detection-")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen([sys.executable, "-u", "-m", "orchestrator.cli", "train",
                             str(ROOT / "configs" / "tiny-moe.yaml"), "--launcher", launcher,
                             *_overrides(tmp, launcher, hang_timeout, data_cache)],
                            cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), l) for l in proc.stdout),
                              daemon=True)
    reader.start()
    while _rank_step(tmp, 1) < 3:        # mid-training, after the first checkpoint
        if proc.poll() is not None:
            raise RuntimeError("the job ended before the hang was injected")
        time.sleep(0.2)
    (pid_path,) = glob.glob(f"{tmp}/runs/*/workers/rank1.pid")
    with open(pid_path, encoding="ascii") as handle:
        pid = int(handle.read())
    os.kill(pid, signal.SIGSTOP)
    stopped = time.monotonic()
    proc.wait(600)
    exited = time.monotonic() - stopped
    reader.join(5)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass

    def first(text: str) -> float | None:
        found = [t - stopped for t, line in lines if t >= stopped and text in line]
        return found[0] if found else None

    return {"launcher": launcher, "hang_timeout_s": hang_timeout, "rc": proc.returncode,
            "named_s": first("stopped in"), "group_failed_s": first("worker group failed"),
            "next_step_s": first("first step: "), "driver_exit_s": exited}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--launchers", nargs="+", default=["torchrun", "ray"])
    parser.add_argument("--hang-timeout", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)
    data_cache = tempfile.mkdtemp(prefix="fault-detection-data-")
    runs = []
    for _ in range(args.rounds):
        for launcher in args.launchers:                  # interleaved
            runs.append(one_round(launcher, args.hang_timeout, data_cache))
            print(json.dumps(runs[-1]), flush=True)
    keys = ("named_s", "group_failed_s", "next_step_s", "driver_exit_s")
    rows = []
    for launcher in args.launchers:
        mine = [r for r in runs if r["launcher"] == launcher]
        rows.append([launcher, len(mine)] + [
            median(v) if (v := [r[k] for r in mine if r[k] is not None]) else "-" for k in keys])
    print_table(f"seconds after SIGSTOP of rank 1 (cluster.hang_timeout_s={args.hang_timeout:g})",
                ["launcher", "rounds", *keys], rows)
    write_json("fault_detection", {"runs": runs})


if __name__ == "__main__":
    main()
