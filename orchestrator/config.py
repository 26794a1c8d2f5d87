"""Load, override, validate and resolve a run config.

Everything here is cheap and side-effect free (no torch, no Ray, no files written), so
`foldmoe validate` and the pre-flight check of `foldmoe train` answer in well under a
second. Every problem surfaces as a ConfigError whose message reads
`<dotted.key>=<value>: <why>`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from engine.config.job import JobSpec
from engine.config.layout_plan import check_fits, plan_layout
from engine.config.model import ModelConfig, get_preset, with_overrides
from engine.parallel.config import LayoutError, ParallelConfig
from engine.parallel.ranks import RankLayout
from engine.config.train import TrainConfig

from .errors import ConfigError
from .schema import MOE_SIZE_KEYS, RunSchema




def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The config file and its `--set` overrides, shared by every command that takes one."""
    parser.add_argument("config", help="run config YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, value parsed as YAML (repeatable)")


def fmt_value(value: Any) -> str:
    return json.dumps(value, default=str) if not isinstance(value, str) else value


# ---------------------------------------------------------------- loading + overrides

def read_yaml(path: str | os.PathLike) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"config={path}: cannot read ({err.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise ConfigError(f"config={path}: not valid YAML{line}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config={path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`--set a.b=value`: the value is parsed as YAML (`2`, `null`, `[2, 4]`, `bf16`)."""
    data = json.loads(json.dumps(data))  # deep copy of plain YAML data
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item}: expected key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"{key}={raw}: value is not valid YAML") from None
        node = data
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{'.'.join(parts[:depth + 1])}={fmt_value(node)}: not a section")
        node[parts[-1]] = value
    return data


def _schema_error(err: ValidationError) -> ConfigError:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    why = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        why = "unknown key"
    return ConfigError(f"{key}={fmt_value(first['input'])}: {why}")


# ---------------------------------------------------------------- the resolved run

@dataclass(frozen=True)
class RunConfig:
    """A validated run: the schema plus the engine configs built from it."""

    schema: RunSchema
    name: str
    model: ModelConfig
    train: TrainConfig
    world_sizes: tuple[int, ...]   # the sizes the layout was checked for (min..max if elastic)

    @property
    def elastic(self) -> bool:
        return isinstance(self.schema.cluster.num_workers, list)

    @property
    def checkpoint_dir(self) -> str:
        return self.schema.checkpoint.dir or os.path.join("checkpoints", self.name)

    @property
    def run_name(self) -> str:
        return self.schema.tracking.run_name or self.name

    def parallel(self, world_size: int) -> ParallelConfig:
        """The layout for `world_size` workers: with `parallel.auto` the planner's first row
        (orchestrator/planning.py); for an elastic run the one its workers use at that size
        (re-planned where the configured one does not fit, as JobSpec does); else the
        configured degrees."""
        if self.schema.parallel.auto:
            from .planning import auto_layout
            return auto_layout(self, world_size)[0]
        p = _degrees(self.schema)
        if self.elastic:
            return plan_layout(p, world_size, self.model, self.train)
        return ParallelConfig(world_size=world_size, **p)

    def job_spec(self, *, job_dir: str, data_dir: str, checkpoint_dir: str, events_path: str) -> JobSpec:
        """What the workers get: the engine's configs and this job's absolute paths; with
        `parallel.auto`, the planner's layout for every world size the run may have."""
        c, ckpt = self.schema.cluster, self.schema.checkpoint
        layouts = {}
        if self.schema.parallel.auto:
            layouts = {str(w): _layout_degrees(self.parallel(w)) for w in self.world_sizes}
        return JobSpec(model=self.model, train=self.train, parallel=_degrees(self.schema),
                       job_dir=job_dir, data_dir=data_dir, checkpoint_dir=checkpoint_dir,
                       events_path=events_path, dispatcher=self.schema.moe.dispatcher,
                       use_gpu=c.use_gpu, cpus_per_worker=c.cpus_per_worker,
                       collective_timeout_s=c.collective_timeout_s,
                       checkpoint_every_steps=ckpt.every_steps, checkpoint_keep=ckpt.keep,
                       checkpoint_async=ckpt.async_save, preempt_grace_s=ckpt.preempt_grace_s,
                       resume=ckpt.resume, resume_since_unix=None if ckpt.resume else time.time(),
                       init_from=self.init_from, layouts=layouts)

    @property
    def init_from(self) -> str | None:
        path = self.schema.model.init_from
        return os.path.abspath(path) if path is not None else None

    def layout_table(self, world_size: int) -> dict[str, list[list[int]]]:
        return RankLayout(self.parallel(world_size)).table()

    def resolved(self) -> dict:
        """The full config with preset values filled in; loading it gives the same run."""
        s = self.schema
        model = {"preset": s.model.preset} if s.model.init_from is None else {"init_from": s.model.init_from}
        model.update({f.name: _plain(getattr(self.model, f.name))
                      for f in dataclasses.fields(ModelConfig) if f.name != "moe"})
        model.update({key: getattr(self.model.moe, moe_key) for key, moe_key in MOE_SIZE_KEYS.items()})
        moe = {f.name: getattr(self.model.moe, f.name) for f in dataclasses.fields(self.model.moe)
               if f.name not in MOE_SIZE_KEYS.values()}
        moe["dispatcher"] = s.moe.dispatcher
        out = s.model_dump()
        out.update(name=self.name, model=model, moe=moe, train=dataclasses.asdict(self.train))
        out["checkpoint"]["dir"] = self.checkpoint_dir
        out["tracking"]["run_name"] = self.run_name
        return out


def _model_config(s: RunSchema) -> ModelConfig:
    overrides = {k: getattr(s.model, k) for k in s.model.model_fields_set
                 if k not in ("preset", "init_from") and getattr(s.model, k) is not None
                 and k not in MOE_SIZE_KEYS}
    for key, moe_key in MOE_SIZE_KEYS.items():
        from_model = getattr(s.model, key)
        in_moe = moe_key in s.moe.model_fields_set
        if from_model is not None and in_moe and getattr(s.moe, moe_key) != from_model:
            raise ConfigError(f"moe.{moe_key}={getattr(s.moe, moe_key)}: conflicts with "
                              f"model.{key}={from_model}")
        if from_model is not None:
            overrides[f"moe_{moe_key}"] = from_model
    for key in s.moe.model_fields_set - {"dispatcher"}:
        overrides.setdefault(f"moe_{key}", getattr(s.moe, key))
    try:
        if s.model.init_from is not None:
            return pretrained_model_config(s, overrides)
        return get_preset(s.model.preset, **overrides)
    except KeyError as err:
        raise ConfigError(str(err.args[0])) from None
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from None


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def pretrained_model_config(s: RunSchema, overrides: dict) -> ModelConfig:
    """The model of `model.init_from`'s config.json; explicit keys may only change what keeps
    every tensor's shape (a shape key that differs is a contradiction)."""
    from engine.hf.config import HFConfigError, model_config_from_hf, read_hf_config
    from engine.hf.reader import HFWeightError, check_names
    if "preset" in s.model.model_fields_set:
        raise ConfigError(f"model.preset={s.model.preset}: conflicts with model.init_from "
                          "(the shapes come from its config.json); set one of them")
    try:
        hf = read_hf_config(s.model.init_from)
        base = model_config_from_hf(hf)
    except (HFConfigError, KeyError, OSError, ValueError) as err:
        raise ConfigError(f"model.init_from={s.model.init_from}: {err}") from None
    moe_fields = {f.name for f in dataclasses.fields(base.moe)}
    for key, value in overrides.items():
        is_moe = key.startswith("moe_") and key[4:] in moe_fields
        name = key[4:] if is_moe else key
        current = getattr(base.moe if is_moe else base, name, None)
        if key in SHAPE_KEYS and _plain(value) != _plain(current):
            shown = next((k for k, v in MOE_SIZE_KEYS.items() if f"moe_{v}" == key), None)
            label = f"model.{shown}" if shown else (f"moe.{name}" if is_moe else f"model.{key}")
            raise ConfigError(f"{label}={fmt_value(_plain(value))}: contradicts model.init_from "
                              f"config.json ({fmt_value(_plain(current))}); it would change tensor shapes")
    cfg = with_overrides(base, **overrides)
    try:
        check_names(s.model.init_from, cfg, hf["model_type"])
    except (HFWeightError, OSError, ValueError) as err:
        raise ConfigError(f"model.init_from={s.model.init_from}: {err}") from None
    return cfg


# Keys that change a tensor's shape or the set of tensors: fixed by the HF checkpoint.
SHAPE_KEYS = {"vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "ffn_hidden_size", "first_k_dense", "moe_layer_step", "dense_layers", "qkv_bias",
              "qk_norm", "tie_embeddings", "moe_num_experts", "moe_ffn_hidden_size",
              "moe_num_shared_experts", "moe_shared_ffn_hidden_size", "moe_shared_expert_gate"}


def _degrees(s: RunSchema) -> dict[str, Any]:
    """The configured ParallelConfig fields (all but world_size; `auto` is the planner's switch)."""
    return s.parallel.model_dump(exclude={"auto"})


def _layout_degrees(p: ParallelConfig) -> dict[str, Any]:
    return {f.name: getattr(p, f.name) for f in dataclasses.fields(p) if f.name != "world_size"}


def _world_sizes(s: RunSchema) -> tuple[int, ...]:
    """Every world size the run may have: each of min..max for an elastic run."""
    n = s.cluster.num_workers
    return tuple(range(min(n), max(n) + 1)) if isinstance(n, list) else (n,)


def _check_elastic_world(s: RunSchema, model: ModelConfig, train: TrainConfig, world: int) -> None:
    """An elastic world size must admit a layout: the configured one, or the re-planned one."""
    try:
        _check_layout(s, model, train, world)
        return
    except ConfigError:
        pass
    try:
        plan_layout(_degrees(s), world, model, train)
    except (LayoutError, ValueError) as err:
        raise ConfigError(f"cluster.num_workers={fmt_value(s.cluster.num_workers)}: world size "
                          f"{world} admits no layout: {err}") from None


def _check_world_divisible(s: RunSchema, world: int) -> None:
    """Names the axis that breaks `world % (tp*cp*pp)` or `world % (etp*ep*pp)`."""
    p = s.parallel
    for axes in (("tp", "cp", "pp"), ("etp", "ep", "pp")):
        sizes = [getattr(p, a) for a in axes]
        if any(not isinstance(v, int) or v < 1 for v in sizes):
            return  # ParallelConfig names the bad value
        product = sizes[0] * sizes[1] * sizes[2]
        if world % product == 0:
            continue
        culprit = next((a for a in axes if world % getattr(p, a)), None)
        culprit = culprit or max(axes, key=lambda a: getattr(p, a))
        raise ConfigError(
            f"parallel.{culprit}={getattr(p, culprit)}: {'*'.join(axes)} = "
            f"{'*'.join(map(str, sizes))} = {product} does not divide the world size {world} "
            f"(cluster.num_workers={fmt_value(s.cluster.num_workers)})")


def _check_layout(s: RunSchema, model: ModelConfig, train: TrainConfig, world: int) -> None:
    if s.parallel.auto:
        return    # the planner only yields valid layouts; build_run_config asks it for one
    _check_world_divisible(s, world)
    try:
        parallel = ParallelConfig(world_size=world, **_degrees(s))
    except LayoutError as err:
        raise ConfigError(str(err)) from None
    shards = parallel.tp * parallel.cp * (2 if parallel.cp > 1 else 1)
    if train.seq_len % shards:
        raise ConfigError(
            f"train.seq_len={train.seq_len}: must be divisible by tp*cp{'*2' if parallel.cp > 1 else ''}"
            f" = {shards} (sequence-parallel shards{', load-balanced causal CP chunks' if parallel.cp > 1 else ''})")
    if train.seq_len > model.max_seq_len:
        raise ConfigError(f"train.seq_len={train.seq_len}: exceeds model.max_seq_len={model.max_seq_len}")
    try:
        # The workers' own check (the interleaved schedule's micro-batches per DP rank a
        # multiple of pp among it): a layout they would refuse fails here, not in every restart.
        check_fits(model, train, parallel)
    except ValueError as err:
        raise ConfigError(f"{err} (world size {world})") from None


def build_run_config(data: dict, default_name: str = "run") -> RunConfig:
    try:
        s = RunSchema.model_validate(data)
    except ValidationError as err:
        raise _schema_error(err) from None
    model = _model_config(s)
    try:
        train = TrainConfig(**s.train.model_dump())
    except ValueError as err:
        raise ConfigError(str(err)) from None
    sizes = _world_sizes(s)
    for world in sizes:
        if isinstance(s.cluster.num_workers, list):
            _check_elastic_world(s, model, train, world)
        else:
            _check_layout(s, model, train, world)
    run = RunConfig(schema=s, name=s.name or default_name, model=model, train=train, world_sizes=sizes)
    if s.parallel.auto:
        for world in sizes:
            run.parallel(world)   # ConfigError when no layout of that size fits
    return run


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    data = apply_overrides(read_yaml(path), overrides or [])
    return build_run_config(data, default_name=Path(path).stem)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted keys for MLflow params: {"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out
