"""The worker group on Ray Train V2: TorchTrainer + ScalingConfig + FailureConfig + a
UserCallback that records worker-group failures for the driver.

Checkpoints are written by engine.checkpoint.CheckpointManager into checkpoint.dir (the
same format under torchrun); Ray Train provides the worker group, gloo/NCCL setup,
failure detection and restarts. See docs/orchestration.md for why.

The driver calls connect() (start or join Ray), supply() (what the cluster has, for the
preflight), then start(). Ray runs with log_to_driver=False: the workers' output stays in
Ray's session logs, not on the driver's progress display (orchestrator/ray_output.py).
Ray Train, torch and the worker code are imported by start() only: the preflight needs
`ray` alone, so a job that cannot fit is refused before those seconds of imports.
"""
from __future__ import annotations

import math
import os
import threading

import ray

from engine.config.job import JobSpec

from .config import RunConfig as FoldRunConfig
from .errors import describe_error
from .local_ray import join_ray, start_local_ray
from .loopback import is_loopback
from .preflight import ClusterSupply, JobNeeds, host_cores
from .ray_metrics import RayMetricsExporter

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE_PACKAGES = ("engine", "orchestrator", "workers")
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"   # set by Ray's job supervisor for a submitted driver


def connect_or_start_ray(min_cpus: float) -> bool:
    """Connects to $RAY_ADDRESS, or starts an embedded local Ray. Returns True if started here.

    address="local" forces a new instance: a bare ray.init() would silently join any
    `ray start` cluster on this machine. The new one binds loopback only."""
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        # Inside `ray job submit` the job's runtime env (--working-dir) already carries the
        # code; a driver connecting from outside ships foldmoe's packages itself.
        in_job = JOB_CONFIG_ENV in os.environ
        runtime_env = None if in_job else {"py_modules": [os.path.join(REPO_ROOT, p)
                                                          for p in CODE_PACKAGES]}
        join_ray(os.environ["RAY_ADDRESS"], runtime_env=runtime_env, log_to_driver=False)
        return False
    num_cpus = max(os.cpu_count() or 1, math.ceil(min_cpus))
    pythonpath = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    # Loopback only, and its processes pinned to it (orchestrator/local_ray.py).
    start_local_ray(num_cpus, {"PYTHONPATH": pythonpath})
    return True


def loopback_cluster() -> bool:
    """Every node of the Ray cluster has a loopback address (so all are this machine)."""
    return all(is_loopback(n.get("NodeManagerAddress", "")) for n in ray.nodes() if n.get("Alive"))


def autoscaler_max_resources() -> dict[str, float] | None:
    """The most the autoscaler may grow the cluster to (KubeRay / cluster launcher config),
    or None without an autoscaler. Ray Train makes the same (private) call before placing
    workers; any change in it only loses the headroom, never the check on what is there."""
    try:
        from ray._private.state import state

        found = state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - no autoscaler config, or the private API moved
        return None
    return {k: float(v) for k, v in found.items()} if found else None


def cluster_supply(where: str, joined: bool = False) -> ClusterSupply:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.util.get_node_ip_address()
    one_machine = all(n.get("NodeManagerAddress") == here for n in nodes)
    return ClusterSupply(where=where, total=dict(ray.cluster_resources()),
                         available=dict(ray.available_resources()),
                         autoscaler_max=autoscaler_max_resources(),
                         node_resources=[dict(n.get("Resources", {})) for n in nodes],
                         host_cores=host_cores() if one_machine else None, joined=joined)


def scaling_size(cluster) -> dict:
    """ScalingConfig's size arguments: a fixed `num_workers`, or for `[min, max]` Ray Train
    V2's elastic range. Elastic groups restart at the size the cluster's nodes allow after
    a failure (a lost node: fewer workers), and while healthy Ray checks every
    `resize_check_s` whether more workers fit, then restarts the group at the larger size
    (ScalingConfig.elastic_resize_monitor_interval_s; Ray's elastic-training guide)."""
    if not isinstance(cluster.num_workers, list):
        return {"num_workers": cluster.num_workers}
    return {"num_workers": tuple(cluster.num_workers),
            "elastic_resize_monitor_interval_s": float(cluster.resize_check_s)}


# Ray Train reads this in its controller, which gets it from the driver's environment
# (ray.train.v2 constants: ENV_VARS_TO_PROPAGATE).
PLACEMENT_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
ELASTIC_PLACEMENT_TIMEOUT_S = 15.0


def controller_env(cluster) -> dict[str, str]:
    """Environment for Ray Train's controller. After a lost node, an elastic group may be
    tried once more at the old size (the node still counts until the GCS has marked it
    dead, ~15 s after a hard loss); Ray then waits for the placement group for
    RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s by default) before it tries the size that
    fits. `cluster.placement_timeout_s` (default 15 s for an elastic range) shortens that
    wait; the placement of resources that exist takes well under a second, and actor
    start-up is not part of it. A value the user set in the environment wins."""
    timeout = cluster.placement_timeout_s
    if timeout is None and isinstance(cluster.num_workers, list):
        timeout = ELASTIC_PLACEMENT_TIMEOUT_S
    if timeout is None or PLACEMENT_TIMEOUT_ENV in os.environ:
        return {}
    return {PLACEMENT_TIMEOUT_ENV: f"{float(timeout):g}"}


class RayLauncher:
    """start() launches TorchTrainer.fit() in a thread; poll() returns the exit code when done."""

    def __init__(self, run: FoldRunConfig, spec: JobSpec | None, job_dir: str,
                 controller_events_path: str):
        self.run, self.spec, self.job_dir = run, spec, job_dir
        self.controller_events_path = controller_events_path
        self.owns_ray = False
        self.error: str | None = None
        self._rc: int | None = None
        self._thread: threading.Thread | None = None

    def _trainer(self):
        from ray.train import (CheckpointConfig, FailureConfig, LoggingConfig, RunConfig,
                               ScalingConfig)
        from ray.train.torch import TorchConfig, TorchTrainer

        from workers.ray_rendezvous import LoopbackTorchConfig
        from workers.ray_worker import train_loop_per_worker

        from .ray_callbacks import controller_callbacks

        c = self.run.schema.cluster
        resources = {"CPU": c.cpus_per_worker, **({"GPU": 1} if c.use_gpu else {})}
        # A Ray on loopback is one machine (the embedded one, or a `ray start` head on
        # 127.0.0.1): its process group's store listens on loopback too.
        torch_config = LoopbackTorchConfig if loopback_cluster() else TorchConfig
        return TorchTrainer(
            train_loop_per_worker=train_loop_per_worker,
            train_loop_config=self.spec.to_dict(),
            torch_config=torch_config(backend="nccl" if c.use_gpu else "gloo",
                                      timeout_s=c.collective_timeout_s),
            scaling_config=ScalingConfig(use_gpu=c.use_gpu, resources_per_worker=resources,
                                         **scaling_size(c)),
            run_config=RunConfig(
                name=os.path.basename(self.job_dir),
                storage_path=os.path.dirname(self.job_dir),
                failure_config=FailureConfig(max_failures=c.max_failures),
                # Retention of our own checkpoints is CheckpointManager(keep); this keeps Ray's
                # bookkeeping consistent should a checkpoint ever be reported to it.
                checkpoint_config=CheckpointConfig(num_to_keep=self.run.schema.checkpoint.keep or None),
                callbacks=controller_callbacks(self.controller_events_path, self.run.elastic,
                                               self.run.schema.checkpoint.preempt_grace_s),
                # Ray Train's own INFO lines would interleave with the driver's progress.
                logging_config=LoggingConfig(log_level="WARNING")))

    @property
    def connect_phase(self) -> str | None:
        if ray.is_initialized():
            return None              # this process is already a Ray driver
        address = os.environ.get("RAY_ADDRESS")
        return f"connect to Ray at {address}" if address else "start a local Ray"

    def connect(self) -> None:
        needs = JobNeeds.of(self.run)
        self.owns_ray = connect_or_start_ray(needs.max_workers * needs.cpus_per_worker)

    def supply(self) -> ClusterSupply:
        address = os.environ.get("RAY_ADDRESS")
        joined = bool(address) and not self.owns_ray
        return cluster_supply(f"the Ray cluster at {address}" if joined else "the local Ray", joined)

    def sinks(self, job: str, run_name: str) -> list:
        return [RayMetricsExporter(job, run_name)]

    def waiting_for(self) -> str | None:
        """What the placement waits for, from the cluster's free resources."""
        needs = JobNeeds.of(self.run)
        free = ray.available_resources()
        missing = [f"{need * needs.min_workers:g} {r} needed, {free.get(r, 0.0):g} free"
                   for r, need in needs.per_worker().items()
                   if free.get(r, 0.0) < need * needs.min_workers]
        return "; ".join(missing) or "Ray Train is starting the workers"

    def start(self) -> None:
        if not ray.is_initialized():
            self.connect()
        trainer = self._trainer()
        self._thread = threading.Thread(target=self._fit, args=(trainer,), daemon=True,
                                        name="ray-train-fit")
        self._thread.start()

    def _fit(self, trainer) -> None:
        env = controller_env(self.run.schema.cluster)
        os.environ.update(env)          # read when fit() creates the controller
        try:
            trainer.fit()
            self._rc = 0
        except BaseException as err:  # noqa: BLE001 - reported by the driver
            self.error = describe_error(err)
            self._rc = 1
        finally:
            for key in env:
                os.environ.pop(key, None)

    def poll(self) -> int | None:
        if self._thread is not None and self._thread.is_alive():
            return None
        return self._rc

    def stop(self, timeout_s: float = 1.5) -> None:
        """Lets the workers save the step in progress (orchestrator/stop_save.py, up to
        checkpoint.preempt_grace_s), then shuts down best effort within timeout_s: the
        controller and workers are owned by this driver, so they are torn down when it
        exits even if shutdown does not finish."""
        if self._thread is not None and self._thread.is_alive() and self.spec is not None:
            from .stop_save import save_before_stop
            save_before_stop(self.job_dir, self.spec.checkpoint_dir,
                             self.run.schema.checkpoint.preempt_grace_s,
                             finished=lambda: not self._thread.is_alive())
        if self.owns_ray:
            closer = threading.Thread(target=ray.shutdown, daemon=True)
            closer.start()
            closer.join(timeout_s)

    def close(self) -> None:
        if self.owns_ray and ray.is_initialized():
            ray.shutdown()
