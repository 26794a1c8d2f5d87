"""`foldmoe plan`: rank every folded layout of N GPUs for a config, and `parallel.auto`.

The search and the cost model are engine/planner (pure arithmetic); this module builds the
machine (datasheet row, or `--calibrate` measurements), fixes what the config fixes, and
prints. `auto_layout(run, world_size)` is what `parallel.auto: true` runs: the first row of
`foldmoe plan CONFIG --gpus world_size` (with the config's cluster.gpu, 8 GPUs a node, and
the config's micro-batch size and recompute mode, which auto does not change).
"""
from __future__ import annotations

import json

from engine.parallel.config import ParallelConfig
from engine.planner.cost import CostConstants, Machine
from engine.planner.devices import DEVICES, GB
from engine.planner.search import (DEGREE_KEYS, PlanResult, PlanRow, SearchSpace, search_layouts,
                                   why_no_candidate)

from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:       # annotations only: orchestrator.config imports this module for auto
    from .config import RunConfig

ONLY_KEYS = DEGREE_KEYS + ("micro_batch_size", "recompute")
DEFAULT_GPUS_PER_NODE = 8


def parse_only(text: str | None) -> dict:
    """`tp=2,ep=8` -> {"tp": "2", "ep": "8"}; unknown keys are a ConfigError."""
    out: dict = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in ONLY_KEYS:
            raise ConfigError(f"--only {item}: expected key=value with key in {', '.join(ONLY_KEYS)}")
        out[key] = value.strip()
    return out


def memory_limit(run: RunConfig, gpu: str) -> float | None:
    """Bytes per GPU: cluster.device_memory_gb, else the datasheet. CPU workers are not
    limited unless cluster.device_memory_gb is set, as in `foldmoe validate` (they share
    the host in proportions the config cannot know); this also keeps `parallel.auto`'s
    choice the same on every machine that computes it (driver and workers)."""
    if run.schema.cluster.device_memory_gb is not None:
        return run.schema.cluster.device_memory_gb * GB
    return None if gpu == "cpu" else DEVICES[gpu].memory_bytes


def machine_for(gpu: str, gpus_per_node: int, calibrated: dict | None = None) -> Machine:
    """The datasheet machine, or the calibrated one (engine/planner/calibrate.py)."""
    if calibrated is None:
        return Machine(DEVICES[gpu], gpus_per_node)
    rates = dict(calibrated["device"])
    if "inter_node_bytes_per_s" not in rates:
        # one GPU node measures NVLink only: the network stays the datasheet's, at the
        # achievable share the table's constants assume (the calibrated link efficiency is 1)
        rates["inter_node_bytes_per_s"] = (DEVICES[gpu].inter_node_bytes_per_s
                                           * CostConstants().link_efficiency)
    return Machine(DEVICES[gpu].with_rates(**rates), gpus_per_node, CostConstants(**calibrated["constants"]))


def search_space(run: RunConfig, only: dict) -> SearchSpace:
    """parallel.auto keeps the config's micro-batch size and recompute mode."""
    if run.schema.parallel.auto:
        return SearchSpace(micro_batch_sizes=(run.train.micro_batch_size,),
                           recompute=(run.train.recompute,), only=only)
    return SearchSpace(only=only)


def _layout_options(run: RunConfig) -> dict:
    """The parallel settings that are not degrees: every candidate keeps the config's."""
    p = run.schema.parallel
    return {"sequence_parallel": p.sequence_parallel, "cp_mode": p.cp_mode, "cp_a2a_size": p.cp_a2a_size}


def plan(run: RunConfig, gpus: int, *, gpu: str, gpus_per_node: int = DEFAULT_GPUS_PER_NODE,
         only: dict | None = None, calibrated: dict | None = None) -> PlanResult:
    return search_layouts(run.model, run.train, gpus, machine_for(gpu, gpus_per_node, calibrated),
                          memory_limit=memory_limit(run, gpu), dispatcher=run.schema.moe.dispatcher,
                          space=search_space(run, only or {}), options=_layout_options(run))


def no_layout_error(run: RunConfig, gpus: int, result: PlanResult, only: dict | None = None,
                    *, what: str = "plan", hint: str = "") -> ConfigError:
    """The one line for a plan without rows: the rule or filter that left nothing to weigh,
    else memory (the searched candidates did not fit)."""
    reason = why_no_candidate(run.model, run.train, gpus, search_space(run, only or {}),
                              _layout_options(run))
    if reason is None:
        reason = (f"no folded layout of {gpus} GPUs fits in memory (searched {result.searched}); add "
                  "GPUs, lower train.micro_batch_size or raise cluster.device_memory_gb")
    return ConfigError(f"{what}: {reason}{hint}")


def auto_gpu(run: RunConfig) -> str:
    return run.schema.cluster.gpu if run.schema.cluster.use_gpu else "cpu"


def auto_gpus_per_node(run: RunConfig, world_size: int) -> int:
    """CPU workers share one host; GPU nodes have 8 (DGX/HGX)."""
    return world_size if auto_gpu(run) == "cpu" else DEFAULT_GPUS_PER_NODE


_AUTO: dict = {}


def auto_layout(run: RunConfig, world_size: int) -> tuple[ParallelConfig, PlanRow]:
    """The layout `parallel.auto: true` runs on `world_size` workers, and its plan row
    (predicted step time and MFU): the first row of `foldmoe plan CONFIG --gpus world_size`.
    Pure (the same config and world size give the same layout); memoised per process."""
    key = (json.dumps(run.schema.model_dump(), sort_keys=True, default=str), world_size)
    if key not in _AUTO:
        result = plan(run, world_size, gpu=auto_gpu(run), gpus_per_node=auto_gpus_per_node(run, world_size))
        if not result.rows:
            raise no_layout_error(run, world_size, result, what="parallel.auto=true",
                                  hint=f"; see `foldmoe plan --gpus {world_size}`")
        _AUTO[key] = result.rows[0]
    row = _AUTO[key]
    return row.parallel, row


# ------------------------------------------------------------------ printing

def plan_text(result: PlanResult, gpus: int, machine_name: str, top: int) -> str:
    rows = result.rows if top == 0 else result.rows[:top]
    lines = [f"{len(result.rows)} feasible of {result.searched} searched for {gpus} x {machine_name} "
             f"in {result.seconds:.2f} s ({result.cpu_seconds:.2f} s CPU); fastest first"]
    lines += _cp_mode_line(rows)
    lines.append("  #  TP CP PP VPP EP ETP   DP EDP  mbs recompute     step_s  TFLOP/s    MFU  mem_GB")
    for i, r in enumerate(rows):
        d = r.degrees()
        lines.append(f"{i + 1:>3}  {d['tp']:>2} {d['cp']:>2} {d['pp']:>2} {d['vpp']:>3} {d['ep']:>2} "
                     f"{d['etp']:>3} {d['dp']:>4} {d['edp']:>3} {r.micro_batch_size:>4} {r.recompute:<11} "
                     f"{r.step_time_s:>8.4g} {r.tflops_per_gpu:>8.4g} {r.mfu:>6.1%} {r.memory_bytes / GB:>7.3g}")
    for i, r in enumerate(rows[:3]):
        parts = ", ".join(f"{k} {v:.3g}" for k, v in r.breakdown.items())
        lines.append(f"  breakdown #{i + 1} (s per step, exposed): {parts}")
    return "\n".join(lines) + "\n"


def _cp_mode_line(rows) -> list[str]:
    """The CP flavour the CP rows are costed for, when it is not the default ring."""
    modes = {(r.parallel.cp_mode, r.parallel.cp_a2a_size) for r in rows if r.parallel.cp > 1}
    return [f"CP rows run parallel.cp_mode={mode}" + (f", cp_a2a_size={size}" if mode == "hybrid" else "")
            for mode, size in sorted(modes) if mode != "ring"]


def plan_json(result: PlanResult, top: int) -> str:
    rows = result.rows if top == 0 else result.rows[:top]
    return json.dumps({"searched": result.searched, "seconds": result.seconds,
                       "cpu_seconds": result.cpu_seconds, "layouts": [r.as_dict() for r in rows]})
