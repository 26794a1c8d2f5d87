"""Preflight checks against described clusters (no Ray): what refuses, what warns, and the
one-line messages that name the resource, the need, the supply and the fix."""
from __future__ import annotations

import pytest

from orchestrator.config import load_config
from orchestrator.preflight import (CHECKS, ClusterSupply, Finding, PreflightError,
                                    check_cpu_oversubscription, run_preflight)

from .jobs import TINY


def _cluster(cpus: float, gpus: float = 0.0, free: dict | None = None, nodes=None, **kwargs):
    total = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    return ClusterSupply(where="the Ray cluster at 127.0.0.1:6379", total=total,
                         available=free if free is not None else dict(total),
                         node_resources=nodes if nodes is not None else [dict(total)], **kwargs)


def test_too_few_cpus_is_one_line_naming_need_supply_and_fix():
    run = load_config(TINY, ["cluster.num_workers=8"])
    with pytest.raises(PreflightError) as info:
        run_preflight(run, _cluster(cpus=2))
    message = str(info.value)
    assert "\n" not in message
    assert message == (
        "CPU: the job needs 8 (8 workers x 1 CPU (cluster.num_workers=8, "
        "cluster.cpus_per_worker)); the Ray cluster at 127.0.0.1:6379 has 2; set "
        "cluster.num_workers to at most 2 (with a layout that fits it), or add CPU to the cluster")
    assert PreflightError.kind == "preflight"


def test_gpus_needed_on_a_cluster_without_any():
    run = load_config(TINY, ["cluster.use_gpu=true"])
    with pytest.raises(PreflightError, match=r"^GPU: the job needs 4 .* has 0; run it on a "
                                             r"cluster with GPUs, or set cluster.use_gpu=false "
                                             r"\(on an autoscaling cluster, .* set cluster.autoscaling=true\)$"):
        run_preflight(run, _cluster(cpus=64, joined=True))
    with pytest.raises(PreflightError, match=r"or set cluster.use_gpu=false$"):   # no hint locally
        run_preflight(run, _cluster(cpus=64))


def test_an_autoscaler_that_reports_no_maximum_leaves_the_shortfall_to_it():
    # KubeRay's autoscaler (Ray 2.60) reports no cluster config: a cluster scaled to zero
    # workers shows 0 GPU and 0 CPU (the head has num-cpus 0) until the job asks for them.
    run = load_config(TINY, ["cluster.use_gpu=true", "cluster.cpus_per_worker=8", "cluster.autoscaling=true"])
    warnings = run_preflight(run, _cluster(cpus=0, nodes=[{"CPU": 0.0}]))
    assert [w.split(":")[0] for w in warnings] == ["CPU", "GPU"]
    assert all("has 0 now; cluster.autoscaling=true: Ray Train waits for the autoscaler" in w
               for w in warnings)


def test_a_worker_larger_than_every_node_is_refused():
    run = load_config(TINY, ["cluster.cpus_per_worker=8"])   # 4 x 8 = 32 CPUs: the total fits
    nodes = [{"CPU": 4.0}] * 8
    with pytest.raises(PreflightError, match="one worker needs 8 .* the largest node .* has 4"):
        run_preflight(run, _cluster(cpus=32, nodes=nodes))


def test_autoscaler_headroom_lets_a_job_wait_for_nodes():
    run = load_config(TINY, ["cluster.num_workers=8"])
    supply = _cluster(cpus=2, autoscaler_max={"CPU": 16.0})
    assert run_preflight(run, supply, [c for c in CHECKS if c is not check_cpu_oversubscription]) == []
    with pytest.raises(PreflightError, match="has 4 at the autoscaler's maximum"):
        run_preflight(run, _cluster(cpus=2, autoscaler_max={"CPU": 4.0}))


def test_busy_cluster_and_elastic_maximum_warn_but_start():
    busy = run_preflight(load_config(TINY), _cluster(cpus=8, free={"CPU": 1.0}))
    assert busy == ["CPU: 3 of the 4 needed are in use by other jobs on the Ray cluster at "
                    "127.0.0.1:6379; Ray Train waits until they are free"]
    # a batch every world size from 4 to 8 admits (dp 2, 5, 3, 7, 4 after re-planning)
    every_size = ["cluster.num_workers=[4, 8]", "train.micro_batch_size=1", "train.global_batch_size=840"]
    elastic = run_preflight(load_config(TINY, every_size), _cluster(cpus=6))
    assert elastic == ["CPU: the Ray cluster at 127.0.0.1:6379 has 6, room for 6 of the 8 "
                       "elastic workers"]


def test_cpu_workers_oversubscribing_the_cores_warn():
    run = load_config(TINY)                            # 4 workers x 1 thread
    (warning,) = run_preflight(run, _cluster(cpus=8, host_cores=2))
    assert warning.startswith("CPU: 4 CPU workers x 1 torch threads = 4 threads on 2 cores "
                              "(2.0x oversubscribed)")
    assert run_preflight(run, _cluster(cpus=8, host_cores=4)) == []
    assert run_preflight(run, _cluster(cpus=8, host_cores=None)) == []   # remote nodes: unknown
    gpu = load_config(TINY, ["cluster.use_gpu=true"])
    assert check_cpu_oversubscription(gpu, _cluster(cpus=8, gpus=4, host_cores=1)) == []


def test_torchrun_supply_schedules_gpus_only():
    """torchrun starts its CPU processes whatever the core count: no CPU refusal there."""
    supply = ClusterSupply(where="this machine", total={"GPU": 0.0}, available={"GPU": 0.0},
                           scheduled=("GPU",), host_cores=64)
    assert run_preflight(load_config(TINY, ["cluster.num_workers=16", "train.global_batch_size=32"]), supply) == []


def test_another_check_is_one_more_function():
    def check_device_memory(run, supply):       # e.g. the memory model's check
        return [Finding("refuse", "GPU memory: the job needs 90 GiB per GPU, H100 has 80 GiB")]

    with pytest.raises(PreflightError, match="^GPU memory: "):
        run_preflight(load_config(TINY), _cluster(cpus=8), [*CHECKS, check_device_memory])


def test_an_elastic_run_without_periodic_checkpoints_is_warned():
    from orchestrator.preflight import check_elastic_checkpoints
    elastic = load_config(TINY, ["cluster.num_workers=[2, 4]", "train.global_batch_size=24", "checkpoint.every_steps=0"])
    (warning,) = check_elastic_checkpoints(elastic, _cluster(cpus=8))
    assert warning.message == ("cluster.num_workers=[2, 4] is elastic but checkpoint.every_steps=0: every "
                               "resize or failure restarts the job at step 0 (set checkpoint.every_steps)")
    assert check_elastic_checkpoints(load_config(TINY, ["cluster.num_workers=[2, 4]", "train.global_batch_size=24", "checkpoint.every_steps=5"]),
                                     _cluster(cpus=8)) == []
    assert check_elastic_checkpoints(load_config(TINY, ["checkpoint.every_steps=0"]), _cluster(cpus=8)) == []
