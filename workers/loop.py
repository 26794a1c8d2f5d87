"""The per-worker training loop, shared by the Ray Train and torchrun launchers.

A worker gets a JobSpec (engine/config/job.py: the engine's configs and absolute paths,
built by the orchestrator), joins the already-initialised default process group, builds the
folded mesh from the world size it was given, resumes from the newest complete checkpoint,
and runs the remaining steps.
Data for step s is a pure function of (seed, s), so the data position is the step.
"""
from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist

from engine.checkpoint import CheckpointManager
from engine.checkpoint.manager import latest_checkpoint
from engine.compose import build_trainer
from engine.hf.reader import HFWeightSource
from engine.config.job import JobSpec
from engine.data import TokenDataset
from engine.metrics.peak import mfu, peak_flops_per_device, tflops_per_device
from engine.metrics.memory import peak_memory_bytes
from engine.models.transformer import count_parameters
from engine.parallel.mesh import FoldedMesh
from engine.train.state import layout_of, load_resharded
from engine.train.trainer import Trainer
from workers.heartbeat import Heartbeat


class Reporter(Protocol):
    """Where a worker's events go (Ray Train report, or the event file under torchrun)."""

    def start(self, info: dict) -> None: ...

    def step(self, record: dict) -> None: ...


def worker_device(spec: JobSpec) -> torch.device:
    if spec.use_gpu:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    torch.set_num_threads(max(1, int(spec.cpus_per_worker)))
    return torch.device("cpu")


def write_pid_file(job_dir: str, rank: int) -> None:
    """workers/rank<N>.pid in the job dir: which process is which rank (py-spy, kill tests)."""
    pid_dir = os.path.join(job_dir, "workers")
    os.makedirs(pid_dir, exist_ok=True)
    tmp = os.path.join(pid_dir, f".rank{rank}.pid.tmp")
    with open(tmp, "w") as handle:
        handle.write(f"{os.getpid()}\n")
    os.replace(tmp, os.path.join(pid_dir, f"rank{rank}.pid"))


def resume(trainer: Trainer, manager: CheckpointManager, spec: JobSpec) -> int | None:
    """Loads the newest complete checkpoint; returns its step, or None for a fresh start.

    The checkpoint may come from any world size and layout: each rank reads only the
    regions of the saved shards it needs (engine.train.state.load_resharded)."""
    if not spec.resume:
        return None
    path = manager.latest()
    if path is None:
        return None
    load_resharded(trainer, path)
    return trainer.completed_steps


def _should_save(spec: JobSpec, completed: int) -> bool:
    every = spec.checkpoint_every_steps
    return every > 0 and (completed % every == 0 or completed == spec.train.steps)


def step_record(step: int, metrics: dict, world_size: int, peak_flops: float) -> dict:
    """The trainer's metrics plus the throughput figures derived from them."""
    seconds = metrics["step_time_s"]
    record = {"step": step, "time": time.time(), **metrics}
    record["tokens_per_s"] = metrics["tokens"] / seconds
    record["tflops_per_device"] = tflops_per_device(metrics["model_flops"], seconds, world_size)
    record["mfu"] = mfu(metrics["model_flops"], seconds, world_size, peak_flops)
    return record


def max_over_ranks(values: list[int], device: torch.device) -> list[int]:
    """Element-wise maximum over the whole world, on the model's device (NCCL-safe)."""
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [int(v) for v in tensor.tolist()]
def pretrained_weights(spec: JobSpec):
    """The HF source of `model.init_from`, unless a checkpoint will replace the weights anyway."""
    if spec.init_from is None or (spec.resume and latest_checkpoint(spec.checkpoint_dir)):
        return None
    return HFWeightSource(spec.init_from)


def run_worker(spec: JobSpec, reporter: Reporter) -> dict:
    """Trains from the latest checkpoint to train.steps; returns the last step record."""
    rank, world = dist.get_rank(), dist.get_world_size()
    write_pid_file(spec.job_dir, rank)
    # Where this rank is, for the driver's watchdog (hangs, stragglers): orchestrator/watchdog.py
    heartbeat = Heartbeat(spec.job_dir, rank, world).start()
    try:
        record = _train(spec, reporter, heartbeat, rank, world)
    except BaseException:
        heartbeat.close("failed")
        raise
    heartbeat.close("exited")
    return record


def _train(spec: JobSpec, reporter: Reporter, heartbeat: Heartbeat, rank: int, world: int) -> dict:
    heartbeat.phase("build")
    device = worker_device(spec)
    # Every group of the mesh gets the job's timeout: a hung peer fails the collective.
    mesh = FoldedMesh(spec.parallel_config(world), timeout=timedelta(seconds=spec.collective_timeout_s))
    trainer = build_trainer(spec.model, spec.train, mesh, dispatcher=spec.dispatcher,
                            attention_backend=spec.attention_backend, device=device,
                            weights=pretrained_weights(spec))
    trainer.phase_listener = heartbeat.phase
    heartbeat.phase("load_checkpoint")
    model_built_at = time.time()
    dataset = TokenDataset(spec.data_dir, spec.train.seq_len)
    manager = CheckpointManager(spec.checkpoint_dir, spec.checkpoint_keep, rank, world,
                                barrier=dist.barrier)
    resumed_from = resume(trainer, manager, spec)
    checkpoint_loaded_at = time.time()
    peak, peak_source = peak_flops_per_device(device, spec.train.precision)
    build_peak, held = max_over_ranks([trainer.build_peak_bytes or 0, trainer.param_bytes], device)
    memory = {"build_peak_bytes": build_peak, "param_bytes": held}   # max over ranks
    reporter.start({"world_size": world, "layout": layout_of(trainer), "rank0_pid": os.getpid(),
                    "model_built_at": model_built_at, "checkpoint_loaded_at": checkpoint_loaded_at,
                    "resumed_from_step": resumed_from, "peak_flops": peak,
                    "peak_flops_source": peak_source, "device": str(device),
                    "params": count_parameters(spec.model), **memory})
    record: dict = {}
    train = spec.train
    for step in range(resumed_from or 0, train.steps):
        batch = dataset.global_batch(step, train.global_batch_size, train.seed)
        heartbeat.begin_step(step)
        metrics = trainer.train_step(step, batch)
        heartbeat.end_step(step)
        heartbeat.phase("report", ("world",))
        record = step_record(step, metrics, world, peak)
        (record["memory_peak_bytes"],) = max_over_ranks([peak_memory_bytes(device)], device)
        record.update(memory)
        record["checkpointed"] = _should_save(spec, step + 1)
        if record["checkpointed"]:
            heartbeat.phase("checkpoint", ("world",))
            manager.save(step + 1, trainer.checkpoint_state())
        reporter.step(record)
    return record
