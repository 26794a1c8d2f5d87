"""Connects the trainer to the pipeline executor: the schedule asked for, static p2p shapes."""
from __future__ import annotations

import torch

from engine.pipeline.executor import PipelineExecutor
from engine.pipeline.schedules import build_schedule
from engine.pipeline.verify import check_schedule


def activation_shape(trainer) -> tuple[int, int, int]:
    """[mbs, s_local, h]: the sequence is split by CP, then by TP under sequence parallelism."""
    cfg = trainer.mesh.config
    s_local = trainer.train_cfg.seq_len // cfg.cp // cfg.tp
    return (trainer.train_cfg.micro_batch_size, s_local, trainer.model_cfg.hidden_size)


def build_executor(trainer) -> PipelineExecutor:
    cfg = trainer.mesh.config
    m = trainer.num_microbatches
    programs = build_schedule(trainer.train_cfg.pipeline_schedule, cfg.pp, m, cfg.vpp)
    check_schedule(programs, cfg.pp * cfg.vpp, m)   # proves pairing and no deadlock up front
    dtype = torch.bfloat16 if trainer.train_cfg.precision == "bf16" else torch.float32
    return PipelineExecutor(trainer.chunks, trainer.mesh, programs[trainer.mesh.pp_rank],
                            trainer.loss_fn, activation_shape(trainer), dtype, trainer.device)
