"""Worker entrypoint without Ray: `python -m workers.torchrun_main SPEC.json`.

Started by foldmoe's torchrun launcher (orchestrator/torchrun_launcher.py) or by a user's
own `torchrun` on several nodes: either sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
(and TORCHELASTIC_USE_AGENT_STORE when the launcher hosts the store); this joins the
process group (gloo on CPU, NCCL on GPU) the env:// way and runs the same loop as the Ray
Train workers.
"""
from __future__ import annotations

import sys
from datetime import timedelta

import torch.distributed as dist

from engine.config.job import JobSpec
from workers.eval_worker import run_eval
from workers.loop import run_worker
from workers.reporters import FileReporter


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0], encoding="utf-8") as handle:
        spec = JobSpec.from_json(handle.read())
    backend = "nccl" if spec.use_gpu else "gloo"
    # A dead or stuck peer must fail the collectives (and trigger a restart), not hang forever.
    dist.init_process_group(backend, timeout=timedelta(seconds=spec.collective_timeout_s))
    try:
        if spec.task == "eval":
            run_eval(spec)
        else:
            run_worker(spec, FileReporter(spec.events_path, dist.get_rank()))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
