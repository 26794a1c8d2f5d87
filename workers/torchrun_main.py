"""Worker entrypoint without Ray: `python -m workers.torchrun_main SPEC.json`.

Started by foldmoe's torchrun launcher (orchestrator/torchrun_launcher.py) or by a user's
own `torchrun` on several nodes: either sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
(and TORCHELASTIC_USE_AGENT_STORE when the launcher hosts the store); this joins the
process group (gloo on CPU, NCCL on GPU) the env:// way and runs the same loop as the Ray
Train workers.
A preempted worker (SIGTERM, workers/preemption.py) exits with EXIT_PREEMPTED after the
group saved.
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch.distributed as dist

from engine.config.job import JobSpec
from workers.eval_worker import run_eval
from workers.loop import run_worker
from workers.preemption import EXIT_PREEMPTED, Preempted
from workers.reporters import FileReporter


def _attempt_store(timeout: timedelta) -> dict:
    """The store of this attempt of the worker group, for a restarted group.

    A user's torchrun keeps one agent store across restarts of the group, and env://
    rendezvous (torch 2.13) reuses it without a per-attempt prefix, so a restarted group reads the
    dead group's gloo addresses and its init_process_group hangs until the timeout.
    A PrefixStore per TORCHELASTIC_RESTART_COUNT keeps the attempts apart."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    world_size = int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timeout)
    return {"store": dist.PrefixStore(f"foldmoe/attempt_{attempt}", store),
            "rank": int(os.environ["RANK"]), "world_size": world_size}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0], encoding="utf-8") as handle:
        spec = JobSpec.from_json(handle.read())
    backend = "nccl" if spec.use_gpu else "gloo"
    # A dead or stuck peer must fail the collectives (and trigger a restart), not hang forever.
    timeout = timedelta(seconds=spec.collective_timeout_s)
    dist.init_process_group(backend, timeout=timeout, **_attempt_store(timeout))
    try:
        if spec.task == "eval":
            run_eval(spec)
        else:
            run_worker(spec, FileReporter(spec.events_path, dist.get_rank()))
    except Preempted as stop:
        # Every rank saved this step (durably, and said so in the events): a non-zero exit
        # makes the launcher restart the group, which resumes here; a stopping launcher just
        # ends. Exit now: the grace is short, and interpreter teardown of a torch process
        # takes seconds on a loaded machine.
        print(f"rank {dist.get_rank()}: {stop}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_PREEMPTED)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
