"""The layout a run uses at a given world size: the configured one where it is valid,
else the re-planned one (engine/parallel/replan.py), checked against the model and the
training config. Workers (JobSpec) and the orchestrator (config validation, `foldmoe
validate`) both call `plan_layout`, so they agree on the layout of every world size."""
from __future__ import annotations

import math

from engine.parallel.config import ParallelConfig
from engine.parallel.replan import replan

from .model import ModelConfig
from .train import TrainConfig, pipeline_schedule_for


def configured_layout(parallel: dict) -> ParallelConfig:
    """The configured degrees, at the smallest world size they are valid for."""
    p = {key: parallel.get(key, 1) for key in ("tp", "cp", "pp", "ep", "etp")}
    world = math.lcm(p["tp"] * p["cp"] * p["pp"], p["etp"] * p["ep"] * p["pp"])
    return ParallelConfig(world_size=world, **parallel)


def check_fits(model: ModelConfig, train: TrainConfig, parallel: ParallelConfig) -> None:
    """ValueError naming the key when `parallel` cannot run this model and batch."""
    parallel.validate_for_model(
        num_heads=model.num_heads, num_kv_heads=model.num_kv_heads,
        num_experts=model.moe.num_experts, num_layers=model.num_layers,
        vocab_size=model.vocab_size)
    micro = train.num_microbatches(parallel.dp)
    if parallel.pp > 1:
        if pipeline_schedule_for(train.pipeline_schedule, parallel.vpp) == "interleaved" \
                and micro % parallel.pp:
            raise ValueError(f"interleaved 1F1B with pp={parallel.pp} needs the micro-batches "
                             f"per DP rank ({micro}) to be a multiple of pp")
    shards = parallel.tp * parallel.cp * (2 if parallel.cp > 1 else 1)
    if train.seq_len % shards:
        raise ValueError(f"train.seq_len={train.seq_len}: must be divisible by the {shards} "
                         "sequence shards of tp x cp (x2 for load-balanced causal CP)")


def plan_layout(parallel: dict, world_size: int, model: ModelConfig,
                train: TrainConfig) -> ParallelConfig:
    """The configured layout at `world_size` if it fits, else the re-planned one;
    LayoutError when no layout fits."""
    return replan(configured_layout(parallel), world_size,
                  check=lambda candidate: check_fits(model, train, candidate))
