"""JobSpec: everything a worker needs to run its part of a job, built by the orchestrator.

Data flows one way: CLI/driver -> JobSpec -> worker -> engine. The spec holds the engine's
own configs plus resolved paths, so workers never read the user's YAML or import the
orchestrator. It travels as JSON (a file under torchrun, the train-loop config under Ray).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from engine.parallel.config import ParallelConfig

from .layout_plan import plan_layout
from .model import ModelConfig, MoEConfig
from .train import TrainConfig


@dataclass(frozen=True)
class JobSpec:
    model: ModelConfig
    train: TrainConfig
    parallel: dict[str, Any]          # ParallelConfig fields except world_size (known at start)
    job_dir: str                      # absolute: events, worker PIDs, logs
    data_dir: str                     # absolute: the prepared token file
    checkpoint_dir: str               # absolute
    events_path: str                  # absolute: where rank 0 appends its events
    dispatcher: str = "alltoall"
    attention_backend: str = "auto"
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    collective_timeout_s: float = 600.0
    checkpoint_every_steps: int = 0
    checkpoint_keep: int = 2
    checkpoint_async: bool = True     # periodic saves written in a background thread
    preempt_grace_s: float = 25.0     # SIGTERM: finish the step, save it, exit within this
    resume: bool = True
    # resume=False (--no-resume): a restarted worker group of this job still resumes from the
    # checkpoints the job itself wrote, those created at or after this time (the driver's start).
    resume_since_unix: float | None = None
    init_from: str | None = None      # HF model dir: initial weights when no checkpoint exists
    layouts: dict[str, dict[str, Any]] = field(default_factory=dict)   # world size -> degrees
    task: str = "train"               # "train" | "eval" (foldmoe eval: workers/eval_worker.py)
    eval_tokens: str | None = None    # eval: a JSONL of {"input_ids": [...]} rows (else the held-out split)

    def parallel_config(self, world_size: int) -> ParallelConfig:
        """The layout the orchestrator chose for `world_size` (`parallel.auto`), else the
        configured one, re-planned when it does not fit `world_size` (an elastic restart on
        fewer or more workers; rule in engine/parallel/replan.py)."""
        if str(world_size) in self.layouts:
            return ParallelConfig(world_size=world_size, **self.layouts[str(world_size)])
        return plan_layout(self.parallel, world_size, self.model, self.train)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobSpec":
        data = dict(data)
        model = dict(data.pop("model"))
        model["moe"] = MoEConfig(**model["moe"])
        return cls(model=ModelConfig(**model), train=TrainConfig(**data.pop("train")), **data)

    @classmethod
    def from_json(cls, text: str) -> "JobSpec":
        return cls.from_dict(json.loads(text))
