"""Worker entrypoint under torch.distributed.run: `python -m workers.torchrun_main SPEC.json`.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; this joins the process group
(gloo on CPU, NCCL on GPU) and runs the same loop as the Ray Train workers.
"""
from __future__ import annotations

import json
import sys
from datetime import timedelta

import torch.distributed as dist

from workers.loop import run_worker
from workers.reporters import FileReporter


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0], encoding="utf-8") as handle:
        spec = json.load(handle)
    backend = "nccl" if spec["config"]["cluster"]["use_gpu"] else "gloo"
    # A dead or stuck peer must fail the collectives (and trigger a restart), not hang forever.
    timeout = timedelta(seconds=spec["config"]["cluster"]["collective_timeout_s"])
    dist.init_process_group(backend, timeout=timeout)
    try:
        run_worker(spec, FileReporter(spec["events_path"], dist.get_rank()))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
