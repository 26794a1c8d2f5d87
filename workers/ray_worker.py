"""Worker entrypoint under Ray Train V2 (`TorchTrainer(train_loop_per_worker=...)`).

Ray Train has already initialised torch.distributed (gloo on CPU, NCCL on GPU) and set
RANK/WORLD_SIZE/LOCAL_RANK before this runs.
"""
from __future__ import annotations

import logging

import ray.train

from engine.config.job import JobSpec
from workers.loop import run_worker
from workers.reporters import RayReporter


def train_loop_per_worker(spec_dict: dict) -> None:
    """`spec_dict` is JobSpec.to_dict(): plain data, as Ray's train_loop_config carries it."""
    spec = JobSpec.from_dict(spec_dict)
    # Ray Train logs every report at INFO on every worker (through the root logger, which
    # Ray Train sets to INFO); the driver shows progress instead. Warnings still show.
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    rank = ray.train.get_context().get_world_rank()
    run_worker(spec, RayReporter(spec.events_path, rank, spec.train.steps))
