"""Preflight: before any worker is placed, compare what the job needs with what the
cluster has, and refuse in seconds (exit 2, one line) when it cannot fit.

Without this, Ray Train waits for resources that never come: it prints
WorkerGroupStartupTimeoutError every 60 s and retries for ever. Each check is a function
`check(run, supply) -> list[Finding]`; CHECKS is the list the driver runs, so another
check (device memory from the memory model, say) is one more function in it.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable, Literal

from .config import ConfigError, RunConfig, fmt_value


class PreflightError(ConfigError):
    """The job cannot fit the cluster; str(err) is one line: resource, need, supply, fix."""

    kind = "preflight"


@dataclass(frozen=True)
class Finding:
    level: Literal["refuse", "warn"]
    message: str


@dataclass(frozen=True)
class ClusterSupply:
    """What the launcher found. Resources absent from `scheduled` are not enforced there
    (torchrun starts its processes whatever the CPU count)."""

    where: str                                   # "the local Ray", "the Ray cluster at ..."
    total: dict[str, float]                      # ray.cluster_resources()
    available: dict[str, float]                  # ray.available_resources()
    scheduled: tuple[str, ...] = ("CPU", "GPU")
    autoscaler_max: dict[str, float] | None = None   # the most the autoscaler may grow to
    node_resources: list[dict[str, float]] = field(default_factory=list)   # alive nodes
    host_cores: int | None = None                # cores under every CPU worker, if one machine
    joined: bool = False                         # a Ray cluster this job joined (it may autoscale)

    def capacity(self, resource: str) -> float:
        now = self.total.get(resource, 0.0)
        if self.autoscaler_max is not None:
            return max(now, float(self.autoscaler_max.get(resource, 0.0)))
        return now


@dataclass(frozen=True)
class JobNeeds:
    min_workers: int
    max_workers: int
    cpus_per_worker: float
    gpus_per_worker: int

    @classmethod
    def of(cls, run: RunConfig) -> "JobNeeds":
        c = run.schema.cluster
        sizes = c.num_workers if isinstance(c.num_workers, list) else [c.num_workers] * 2
        return cls(sizes[0], sizes[1], float(c.cpus_per_worker), 1 if c.use_gpu else 0)

    def per_worker(self) -> dict[str, float]:
        return {"CPU": self.cpus_per_worker, **({"GPU": float(self.gpus_per_worker)}
                                                 if self.gpus_per_worker else {})}


Check = Callable[[RunConfig, ClusterSupply], list[Finding]]


def _n(value: float) -> str:
    return f"{value:g}"


def _workers_key(run: RunConfig) -> str:
    return f"cluster.num_workers={fmt_value(run.schema.cluster.num_workers)}"


def check_worker_resources(run: RunConfig, supply: ClusterSupply) -> list[Finding]:
    """workers x (CPU, GPU) per worker against the cluster's total (or autoscaler maximum),
    each worker against the largest node, and a warning when others hold what is needed."""
    needs, findings = JobNeeds.of(run), []
    for resource, per_worker in needs.per_worker().items():
        if resource not in supply.scheduled or per_worker <= 0:
            continue
        need, capacity = needs.min_workers * per_worker, supply.capacity(resource)
        how = (f"{needs.min_workers} workers x {_n(per_worker)} {resource} "
               f"({_workers_key(run)}, {_per_worker_key(resource)})")
        growth = "" if supply.autoscaler_max is None else " at the autoscaler's maximum"
        # An autoscaler that does not report its maximum (KubeRay's, in Ray 2.60): what is
        # there now says nothing about what can come, so a shortfall is the autoscaler's to fill.
        unknown_max = supply.autoscaler_max is None and run.schema.cluster.autoscaling
        if need > capacity and unknown_max:
            findings.append(Finding("warn", (
                f"{resource}: the job needs {_n(need)} ({how}); {supply.where} has {_n(capacity)} "
                "now; cluster.autoscaling=true: Ray Train waits for the autoscaler to add nodes")))
            continue
        if need > capacity:
            hint = ("" if supply.autoscaler_max is not None or capacity > 0 or not supply.joined else
                    " (on an autoscaling cluster, e.g. KubeRay with workers from 0, set "
                    "cluster.autoscaling=true)")
            findings.append(Finding("refuse", (
                f"{resource}: the job needs {_n(need)} ({how}); {supply.where} has "
                f"{_n(capacity)}{growth}; "
                f"{_remedy(run, resource, math.floor(capacity / per_worker))}{hint}")))
            continue
        largest = max((node.get(resource, 0.0) for node in supply.node_resources), default=None)
        if not unknown_max and supply.autoscaler_max is None and largest is not None \
                and per_worker > largest:
            findings.append(Finding("refuse", (
                f"{resource}: one worker needs {_n(per_worker)} ({_per_worker_key(resource)}) "
                f"but the largest node of {supply.where} has {_n(largest)}; lower "
                f"{_per_worker_key(resource)} or add a larger node")))
            continue
        if needs.max_workers * per_worker > capacity:
            findings.append(Finding("warn", (
                f"{resource}: {supply.where} has {_n(capacity)}{growth}, room for "
                f"{math.floor(capacity / per_worker)} of the {needs.max_workers} elastic workers")))
        free = supply.available.get(resource, 0.0)
        if need > free and supply.autoscaler_max is None and not unknown_max:
            findings.append(Finding("warn", (
                f"{resource}: {_n(need - free)} of the {_n(need)} needed are in use by other "
                f"jobs on {supply.where}; Ray Train waits until they are free")))
    return findings


def _per_worker_key(resource: str) -> str:
    return "cluster.cpus_per_worker" if resource == "CPU" else "cluster.use_gpu (1 GPU per worker)"


def _remedy(run: RunConfig, resource: str, fits: int) -> str:
    if resource == "GPU" and fits < 1:
        return "run it on a cluster with GPUs, or set cluster.use_gpu=false"
    options = [f"set cluster.num_workers to at most {fits} (with a layout that fits it)"] if fits else []
    if resource == "CPU" and (run.schema.cluster.cpus_per_worker > 1 or not fits):
        options.append("lower cluster.cpus_per_worker")
    options.append(f"add {resource} to the cluster")
    return ", or ".join(options)


def check_cpu_oversubscription(run: RunConfig, supply: ClusterSupply) -> list[Finding]:
    """CPU workers run cpus_per_worker torch threads each; more threads than cores on one
    machine time-slice, so steps slow down and MFU reads low."""
    c = run.schema.cluster
    if c.use_gpu or supply.host_cores is None:
        return []
    threads_per_worker = max(1, int(c.cpus_per_worker))
    threads = JobNeeds.of(run).max_workers * threads_per_worker
    if threads <= supply.host_cores:
        return []
    return [Finding("warn", (
        f"CPU: {JobNeeds.of(run).max_workers} CPU workers x {threads_per_worker} torch threads = "
        f"{threads} threads on {supply.host_cores} cores ({threads / supply.host_cores:.1f}x "
        "oversubscribed): steps run slower and MFU reads low; fewer workers or more cores "
        "give truer figures"))]


def check_elastic_checkpoints(run: RunConfig, supply: ClusterSupply) -> list[Finding]:
    """An elastic group restarts at every resize (and failure) from the newest checkpoint:
    without periodic ones, each restart goes back to step 0."""
    ckpt = run.schema.checkpoint
    if not isinstance(run.schema.cluster.num_workers, list) or ckpt.every_steps > 0:
        return []
    return [Finding("warn", (
        f"{_workers_key(run)} is elastic but checkpoint.every_steps=0: every resize or failure "
        "restarts the job at step 0 (set checkpoint.every_steps)"))]


CHECKS: list[Check] = [check_worker_resources, check_cpu_oversubscription, check_elastic_checkpoints]


def run_preflight(run: RunConfig, supply: ClusterSupply, checks: list[Check] | None = None) -> list[str]:
    """Returns the warnings; raises PreflightError with the first refusal."""
    findings = [f for check in (CHECKS if checks is None else checks) for f in check(run, supply)]
    refusals = [f.message for f in findings if f.level == "refuse"]
    if refusals:
        raise PreflightError(refusals[0])
    return [f.message for f in findings if f.level == "warn"]


def host_cores() -> int:
    """Cores this process may run on (affinity-aware: containers, taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
