"""Worker entrypoint under Ray Train V2 (`TorchTrainer(train_loop_per_worker=...)`).

Ray Train has already initialised torch.distributed (gloo on CPU, NCCL on GPU) and set
RANK/WORLD_SIZE/LOCAL_RANK before this runs.
"""
from __future__ import annotations

import logging

import ray.train

from engine.config.job import JobSpec
from workers.eval_worker import run_eval
from workers.loop import run_worker
from workers.reporters import RayReporter


def train_loop_per_worker(spec_dict: dict) -> None:
    """`spec_dict` is JobSpec.to_dict(): plain data, as Ray's train_loop_config carries it.
    A spec with task "eval" runs `foldmoe eval`'s forward-only pass instead of training."""
    spec = JobSpec.from_dict(spec_dict)
    # Ray Train logs every report at INFO on every worker (through the root logger, which
    # Ray Train sets to INFO); the driver shows progress instead. Warnings still show.
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    if spec.task == "eval":
        run_eval(spec)           # rank 0 answers the driver with an "eval" event
        return
    rank = ray.train.get_context().get_world_rank()
    run_worker(spec, RayReporter(spec.events_path, rank, spec.train.steps))
