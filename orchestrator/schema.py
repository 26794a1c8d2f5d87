"""The YAML schema of one run (pydantic v2, unknown keys rejected, strict types).

The `model`, `moe`, `parallel` and `train` sections are generated from the engine's own
dataclasses, so every engine field is a config key and the two can never drift apart.
Only YAML-friendliness is added: a float key also accepts `1e-3`, which YAML 1.1 reads
as a string.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model, field_validator

from engine.config.model import ModelConfig, MoEConfig
from engine.parallel.config import ParallelConfig
from engine.config.train import TrainConfig
from engine.planner.devices import GPU_KINDS


def _float_from_yaml_string(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


Float = Annotated[float, BeforeValidator(_float_from_yaml_string)]
STRICT = ConfigDict(extra="forbid", strict=True)

# MoE sizes are model shape, so they live in `model`; the rest of MoEConfig is in `moe`.
MOE_SIZE_KEYS = {"num_experts": "num_experts", "top_k": "top_k",
                 "moe_ffn_hidden_size": "ffn_hidden_size",
                 "num_shared_experts": "num_shared_experts",
                 "shared_ffn_hidden_size": "shared_ffn_hidden_size"}


def _yaml_type(tp: Any) -> Any:
    if typing.get_origin(tp) is tuple:       # YAML has lists only; the engine makes them tuples
        return list[typing.get_args(tp)[0]]
    if tp is float:
        return Float
    args = typing.get_args(tp)
    if float in args and type(None) in args:
        return Optional[Float]
    return tp


def _section_from_dataclass(name: str, cls: type, *, exclude: set[str] = frozenset(),
                            all_optional: bool = False, extra: dict | None = None) -> type[BaseModel]:
    """A strict pydantic section with one key per dataclass field.

    all_optional: every key defaults to None, meaning "take the preset's value"."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        tp = _yaml_type(hints[f.name])
        if all_optional:
            fields[f.name] = (Optional[tp], None)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            fields[f.name] = (tp, default)
    fields.update(extra or {})
    return create_model(name, __config__=STRICT, **fields)


ModelSection = _section_from_dataclass(
    "ModelSection", ModelConfig, exclude={"moe"}, all_optional=True,
    extra={"preset": (str, "tiny-moe"),
           # A local HF model dir (config.json + *.safetensors): replaces `preset`; the shapes
           # come from its config.json and the initial weights from its tensors.
           "init_from": (Optional[str], None),
           **{key: (Optional[int], None) for key in MOE_SIZE_KEYS}})

MoESection = _section_from_dataclass(
    "MoESection", MoEConfig,
    extra={"dispatcher": (Literal["alltoall", "allgather"], "alltoall")})

# auto: the planner picks tp/cp/pp/vpp/ep/etp for the world size the job gets (orchestrator/plan.py)
ParallelSection = _section_from_dataclass("ParallelSection", ParallelConfig, exclude={"world_size"},
                                          extra={"auto": (bool, False)})

TrainSection = _section_from_dataclass("TrainSection", TrainConfig)


class DataSection(BaseModel):
    model_config = STRICT
    source: str = "stdlib"            # "stdlib" = this Python's own Lib/*.py, or a dir of .txt/.jsonl
    tokenizer: str = "byte"           # "byte" or a path to a Hugging Face tokenizer.json
    cache_dir: str = "data_cache"     # prepared token files, reused across runs
    max_bytes: Optional[int] = Field(None, ge=1)


class ClusterSection(BaseModel):
    model_config = STRICT
    num_workers: Union[int, list[int]] = 1   # an int, or [min, max] for elastic Ray Train
    use_gpu: bool = False
    cpus_per_worker: Float = Field(1.0, gt=0)
    max_failures: int = Field(3, ge=0)        # worker-group restarts before the job fails
    storage_path: str = "runs"                # per-job event log, worker PIDs, Ray Train state
    collective_timeout_s: int = Field(600, ge=10)  # a hung collective fails the step after this
    hang_timeout_s: Float = Field(300.0, ge=3)     # no heartbeat/progress this long: rank stopped
    straggler_factor: Float = Field(1.5, gt=1)     # busier than the others' median x this: straggler
    straggler_steps: int = Field(3, ge=1)          # ... for this many consecutive steps
    resize_check_s: Float = Field(60.0, gt=0)  # elastic: how often Ray Train checks for room to grow
    placement_timeout_s: Optional[Float] = Field(None, gt=0)  # wait for a group's resources; null: 15 s elastic, Ray's 60 s fixed
    autoscaling: bool = False                 # an autoscaler may add nodes the preflight cannot see
    gpu: Literal[GPU_KINDS] = "h100"          # datasheet row (engine/planner/devices.py)
    device_memory_gb: Optional[Float] = Field(None, gt=0)  # overrides the datasheet (10^9 bytes)

    @field_validator("num_workers", mode="before")
    @classmethod
    def _num_workers(cls, value: Any) -> Any:
        def positive(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1
        if positive(value):
            return value
        if isinstance(value, (list, tuple)) and len(value) == 2 and all(map(positive, value)):
            if value[0] > value[1]:
                raise ValueError("[min, max] needs min <= max")
            return list(value)
        raise ValueError("expected a positive int, or [min, max] of positive ints")


class CheckpointSection(BaseModel):
    model_config = STRICT
    dir: Optional[str] = None                 # default checkpoints/<name>
    every_steps: int = Field(0, ge=0)         # 0 = no periodic checkpoints
    keep: int = Field(2, ge=0)                # newest complete checkpoints kept; 0 keeps all
    resume: bool = True                       # resume from the latest complete checkpoint in dir
    async_save: bool = True                   # periodic saves copy to host memory, write in a thread
    preempt_grace_s: Float = Field(25.0, gt=0)  # SIGTERM -> every rank saves the step and exits within


class TrackingSection(BaseModel):
    model_config = STRICT
    uri: Optional[str] = None                 # default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "foldmoe"
    run_name: Optional[str] = None            # default: the config name
    enabled: bool = True
    report: bool = True                       # render the review report at the end, log it as artifacts


class RunSchema(BaseModel):
    model_config = STRICT
    name: Optional[str] = None                # default: the config file's stem
    model: ModelSection = Field(default_factory=ModelSection)
    moe: MoESection = Field(default_factory=MoESection)
    parallel: ParallelSection = Field(default_factory=ParallelSection)
    train: TrainSection = Field(default_factory=TrainSection)
    data: DataSection = Field(default_factory=DataSection)
    cluster: ClusterSection = Field(default_factory=ClusterSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
