"""Worker entrypoint under torch.distributed.run: `python -m workers.torchrun_main SPEC.json`.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; this joins the process group
(gloo on CPU, NCCL on GPU) and runs the same loop as the Ray Train workers. A preempted
worker (SIGTERM, workers/preemption.py) exits with EXIT_PREEMPTED after the group saved.
"""
from __future__ import annotations

import sys
from datetime import timedelta

import torch.distributed as dist

from engine.config.job import JobSpec
from workers.loop import run_worker
from workers.preemption import EXIT_PREEMPTED, Preempted
from workers.reporters import FileReporter


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0], encoding="utf-8") as handle:
        spec = JobSpec.from_json(handle.read())
    backend = "nccl" if spec.use_gpu else "gloo"
    # A dead or stuck peer must fail the collectives (and trigger a restart), not hang forever.
    dist.init_process_group(backend, timeout=timedelta(seconds=spec.collective_timeout_s))
    try:
        run_worker(spec, FileReporter(spec.events_path, dist.get_rank()))
    except Preempted as stop:
        # Every rank saved this step: a non-zero exit makes torchrun restart the group
        # (--max-restarts), which resumes here; a stopping torchrun just ends.
        print(f"rank {dist.get_rank()}: {stop}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
