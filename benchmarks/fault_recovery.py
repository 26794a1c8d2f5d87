"""Recovery after a killed worker, both launchers: `foldmoe train` (tiny-moe, 2 CPU
workers, EP2, a checkpoint every 2 steps) with rank 1 SIGKILLed once the checkpoint of
step 4 is complete; recovery = kill -> the next completed step (the new group placed, the
model built, the checkpoint loaded, one step). Rounds interleave the launchers; each job
runs in its own temporary directory (the Ray one on a fresh embedded Ray, as the quick
start does).

    python -m benchmarks.fault_recovery [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

from benchmarks.common import median, print_table, write_json

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS, EVERY, KILL_AFTER = 16, 2, 4


def _records(path: pathlib.Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def one_job(launcher: str, work: pathlib.Path) -> dict:
    sets = [f"train.steps={STEPS}", "train.seq_len=32", "train.global_batch_size=4",
            "train.micro_batch_size=1", f"checkpoint.every_steps={EVERY}",
            f"checkpoint.dir={work / 'ckpt'}", f"cluster.storage_path={work / 'runs'}",
            f"data.cache_dir={work.parent / 'data_cache'}", "cluster.num_workers=2",
            "parallel.tp=1", "parallel.ep=2", "tracking.enabled=false"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    args = [sys.executable, "-m", "orchestrator.cli", "train", str(ROOT / "configs" / "tiny-moe.yaml"),
            "--launcher", launcher, "--metrics-jsonl", "m.jsonl",
            *[a for s in sets for a in ("--set", s)]]
    log = open(work / "job.log", "wb")
    proc = subprocess.Popen(args, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    manifest = work / "ckpt" / f"step{KILL_AFTER:08d}" / "manifest.json"
    try:
        while not manifest.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"{launcher}: the job ended before step {KILL_AFTER}")
            time.sleep(0.05)
        (pid_file,) = (work / "runs").glob("*/workers/rank1.pid")
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        killed_at, load = time.time(), os.getloadavg()[0]
        rc = proc.wait(600)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    after = [r for r in _records(work / "m.jsonl") if r["time"] > killed_at]
    if rc != 0 or not after:
        raise RuntimeError(f"{launcher}: exit {rc}, {len(after)} steps after the kill")
    return {"recovery_s": after[0]["time"] - killed_at, "resumed_at": after[0]["step"],
            "load_avg_1m": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"torchrun": [], "ray": []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for launcher in runs:
                work = pathlib.Path(tmp) / f"{launcher}-{round_index}"
                work.mkdir()
                try:
                    runs[launcher].append(one_job(launcher, work))
                except RuntimeError as err:     # kept, with the job's last lines
                    tail = (work / "job.log").read_text(errors="replace")[-1500:]
                    runs[launcher].append({"error": str(err), "log_tail": tail})
                print(launcher, runs[launcher][-1], flush=True)
    rows = []
    for name, rs in runs.items():
        ok = [r for r in rs if "recovery_s" in r]
        if ok:
            times = [r["recovery_s"] for r in ok]
            rows.append([name, median(times), min(times), max(times),
                         median([r["load_avg_1m"] for r in ok]), len(rs) - len(ok)])
    print_table("kill -> next completed step (s)",
                ["launcher", "median", "min", "max", "load 1m", "failed runs"], rows)
    write_json("fault_recovery", {"rounds": args.rounds, "runs": runs}, args.json)


if __name__ == "__main__":
    main()
