"""The memory model of a run: the per-role table of `foldmoe validate`, its JSON, and the
refusal of a config whose predicted memory does not fit the device.

Device memory: `cluster.device_memory_gb` when set, else the datasheet row of
`cluster.gpu` (engine/planner/devices.py) when `cluster.use_gpu`. CPU workers are not
checked unless `cluster.device_memory_gb` is set: several workers share one host's memory
in proportions the config cannot know (one host or many, other processes), so the
per-worker budget is for the user to state.
"""
from __future__ import annotations

from engine.planner.devices import DEVICES, GB
from engine.planner.eval_memory import estimate_eval_memory
from engine.planner.memory import MemoryEstimate, RoleMemory, estimate_memory

from .config import ConfigError, RunConfig


def device_budget(run: RunConfig) -> tuple[int | None, str]:
    """(bytes per worker or None when unchecked, what they are)."""
    cluster = run.schema.cluster
    if cluster.device_memory_gb is not None:
        return int(cluster.device_memory_gb * GB), f"cluster.device_memory_gb={cluster.device_memory_gb:g}"
    if cluster.use_gpu:
        gpu = DEVICES[cluster.gpu]
        return gpu.memory_bytes, f"{gpu.name} (cluster.gpu={cluster.gpu})"
    return None, "CPU workers: not checked (set cluster.device_memory_gb to check)"


def estimate(run: RunConfig, world: int) -> MemoryEstimate:
    return estimate_memory(run.model, run.parallel(world), run.train, dispatcher=run.schema.moe.dispatcher)


def _gb(nbytes: float) -> str:
    return f"{nbytes / GB:.2f}"


def memory_text(run: RunConfig, world: int) -> str:
    """The per-role table (GB = 10^9 bytes)."""
    est = estimate(run, world)
    budget, what = device_budget(run)
    limit = f"{_gb(budget)} GB per worker, {what}" if budget else what
    head = ("  role                 params    grads  optimizer  activations  (dispatcher)"
            "    total  worst-case routing")
    lines = [f"memory per worker, predicted (GB = 1e9 bytes); device: {limit}", head]
    for r in est.ranks:
        flag = "  > device" if budget and r.total > budget else ""
        lines.append(f"  {r.role:<18} {_gb(r.params):>8} {_gb(r.grads):>8} {_gb(r.optimizer):>10} "
                     f"{_gb(r.activations):>12}  ({_gb(r.dispatcher):>10}) {_gb(r.total):>8}"
                     f"  {_gb(r.total_worst):>18}{flag}")
    return "\n".join(lines) + "\n"


def memory_json(run: RunConfig, world: int) -> dict:
    est = estimate(run, world)
    budget, what = device_budget(run)
    return {"ranks": [r.as_dict() for r in est.ranks], "device_bytes": budget, "device": what}


def _advice(term: str, role: RoleMemory, run: RunConfig, forward_only: bool = False) -> str:
    train, p = run.train, run.schema.parallel
    experts_dominate = role.param_count.expert > role.param_count.dense
    if term == "optimizer" and not train.zero1:
        return "set train.zero1=true (shards it over dp x cp and edp)"
    if term in ("params", "grads", "optimizer"):
        if experts_dominate:
            return (f"raise parallel.ep (now {p.ep}) or parallel.etp (now {p.etp}) for fewer expert "
                    f"weights per rank, or parallel.pp (now {p.pp})")
        return f"raise parallel.tp (now {p.tp}) or parallel.pp (now {p.pp})"
    options = []
    if train.recompute != "full" and not forward_only:   # a forward keeps nothing to recompute
        options.append("set train.recompute=full")
    if train.micro_batch_size > 1:
        options.append(f"lower train.micro_batch_size (now {train.micro_batch_size})")
    options.append(f"raise parallel.tp (now {p.tp}) or parallel.cp (now {p.cp})")
    return ", or ".join(options)


def check_fits(run: RunConfig) -> None:
    """Raises ConfigError when a role's predicted memory exceeds the device, for every
    world size the run may get (elastic runs: each of [min, max])."""
    if device_budget(run)[0] is None:
        return
    for world in run.world_sizes:
        _refuse_above_budget(run, world, estimate(run, world).peak, forward_only=False)


def check_eval_fits(run: RunConfig, world: int) -> None:
    """The same for `foldmoe eval` at `world` workers: the weights and forwards alone
    (engine/planner/eval_memory.py)."""
    if device_budget(run)[0] is None:
        return
    peak = estimate_eval_memory(run.model, run.parallel(world), run.train, run.schema.moe.dispatcher).peak
    _refuse_above_budget(run, world, peak, forward_only=True)


def _refuse_above_budget(run: RunConfig, world: int, peak: RoleMemory, forward_only: bool) -> None:
    budget, what = device_budget(run)
    if peak.total <= budget:
        return
    term, size = max(peak.terms().items(), key=lambda kv: kv[1])
    task = "eval " if forward_only else ""
    raise ConfigError(
        f"memory: {task}{peak.role} needs {_gb(peak.total)} GB per worker at world size {world}, more "
        f"than the {_gb(budget)} GB of {what}; largest term: {term} {_gb(size)} GB: "
        f"{_advice(term, peak, run, forward_only)}")
