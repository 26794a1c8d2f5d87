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
from typing import Callable, Protocol

import torch
import torch.distributed as dist

from engine.checkpoint import CheckpointManager
from engine.checkpoint.manager import latest_checkpoint
from engine.compose import build_trainer
from engine.hf.reader import HFWeightSource
from engine.config.job import JobSpec
from engine.data.eval_data import TrainWindows, held_out_batches, held_out_windows
from engine.data.index import read_index
from engine.data.position import data_state, resume_position
from engine.metrics.peak import mfu, peak_flops_per_device, tflops_per_device
from engine.metrics.memory import peak_memory_bytes, reset_peak_memory
from engine.models.transformer import count_parameters
from engine.parallel.mesh import FoldedMesh
from engine.train.evaluate import Evaluator, eval_due
from engine.train.host_allocator import retain_freed_host_memory
from engine.train.state import layout_of
from engine.train.trainer import Trainer
from workers.checkpoint_resume import resume_newest_verified
from workers.preemption import STOP_SAVE_KEY, Preempted, PreemptionWatch
from workers.heartbeat import Heartbeat


class Reporter(Protocol):
    """Where a worker's events go (Ray Train report, or the event file under torchrun)."""

    def start(self, info: dict) -> None: ...

    def step(self, record: dict) -> None: ...

    def event(self, event_type: str, **fields) -> None: ...


def worker_device(spec: JobSpec) -> torch.device:
    if spec.use_gpu:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    torch.set_num_threads(max(1, int(spec.cpus_per_worker)))
    retain_freed_host_memory()     # big CPU tensors are re-faulted every step otherwise
    return torch.device("cpu")


def write_pid_file(job_dir: str, rank: int) -> None:
    """workers/rank<N>.pid in the job dir: which process is which rank (py-spy, kill tests)."""
    pid_dir = os.path.join(job_dir, "workers")
    os.makedirs(pid_dir, exist_ok=True)
    tmp = os.path.join(pid_dir, f".rank{rank}.pid.tmp")
    with open(tmp, "w") as handle:
        handle.write(f"{os.getpid()}\n")
    os.replace(tmp, os.path.join(pid_dir, f"rank{rank}.pid"))


def resume(trainer: Trainer, manager: CheckpointManager, spec: JobSpec,
           reporter: Reporter) -> int | None:
    """Loads the newest checkpoint that verifies on every rank (walking back past corrupt
    ones, workers/checkpoint_resume.py); returns its step, or None for a fresh start.

    The checkpoint may come from any world size and layout: each rank reads only the
    regions of the saved shards it needs (engine.train.state.load_resharded)."""
    if spec.resume:
        return resume_newest_verified(trainer, manager.root, reporter.event)
    if spec.resume_since_unix is None:
        return None
    # --no-resume: older checkpoints are ignored, but a restarted group of this job goes on
    # from the ones it wrote itself.
    return resume_newest_verified(trainer, manager.root, reporter.event, spec.resume_since_unix)


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
        record = _build_and_train(spec, reporter, heartbeat, rank, world)
    except BaseException:
        heartbeat.close("failed")
        raise
    heartbeat.close("exited")
    return record


def _build_and_train(spec: JobSpec, reporter: Reporter, heartbeat: Heartbeat, rank: int,
                     world: int) -> dict:
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
    evaluator = Evaluator(trainer)
    manager = CheckpointManager(spec.checkpoint_dir, spec.checkpoint_keep, rank, world,
                                barrier=dist.barrier, commit_timeout_s=spec.collective_timeout_s,
                                own_since_unix=spec.resume_since_unix)
    resumed_from = resume(trainer, manager, spec, reporter)
    checkpoint_loaded_at = time.time()
    position, dataset = _data_position(spec, trainer, reporter, rank)
    train = spec.train    # with train.eval_every, the held-out windows are never trained on
    validation = (held_out_batches(spec.data_dir, train.seq_len, train.eval_batches,
                                   train.global_batch_size) if train.eval_every else [])
    peak, peak_source = peak_flops_per_device(device, spec.train.precision)
    build_peak, held = max_over_ranks([trainer.build_peak_bytes or 0, trainer.param_bytes], device)
    memory = {"build_peak_bytes": build_peak, "param_bytes": held}   # max over ranks
    reporter.start({"world_size": world, "layout": layout_of(trainer), "rank0_pid": os.getpid(),
                    "model_built_at": model_built_at, "checkpoint_loaded_at": checkpoint_loaded_at,
                    "resumed_from_step": resumed_from, "peak_flops": peak,
                    "peak_flops_source": peak_source, "device": str(device),
                    "params": count_parameters(spec.model), **memory})
    watch = PreemptionWatch(spec.job_dir, rank, spec.preempt_grace_s).install()
    try:
        return _train_steps(spec, trainer, dataset, manager, reporter, heartbeat, watch,
                            resumed_from or 0, position.consumed_samples, world, peak, memory,
                            validate=lambda: evaluator.mean_loss(validation))
    finally:
        watch.restore()


def _data_position(spec: JobSpec, trainer: Trainer, reporter: Reporter, rank: int):
    """(Position, TrainWindows) after the checkpoint, if any, was loaded: the samples consumed
    and the held-out windows come from it (engine/data/position.py)."""
    train = spec.train
    tokens = read_index(spec.data_dir).get("tokens_sha256")
    position = resume_position(trainer.data_state, trainer.completed_steps, train,
                               held_out_windows(train), tokens)
    for note in position.notes if rank == 0 else ():
        print(f"data: {note}", flush=True)
        reporter.event("data_position", message=note)
    dataset = TrainWindows(spec.data_dir, train.seq_len, position.held_out, train.global_batch_size)
    trainer.data_state = data_state(position.consumed_samples, train, position.held_out, tokens)
    return position, dataset


def _train_steps(spec: JobSpec, trainer: Trainer, dataset: TrainWindows,
                 manager: CheckpointManager, reporter: Reporter, heartbeat: Heartbeat,
                 watch: PreemptionWatch, first_step: int, consumed: int, world: int, peak: float,
                 memory: dict, validate: Callable[[], float]) -> dict:
    record: dict = {}
    train = spec.train
    rows = trainer.local_batch_rows()     # this rank reads only its DP rank's rows
    for step in range(first_step, train.steps):
        batch = dataset.batch_at(consumed, train.global_batch_size, train.seed, rows)
        reset_peak_memory(trainer.device)     # memory/peak_bytes: this step's own peak
        heartbeat.begin_step(step)
        metrics = trainer.train_step(step, batch, stop_requested=watch.requested)
        heartbeat.end_step(step)
        consumed += train.global_batch_size
        trainer.data_state = {**trainer.data_state, "consumed_samples": consumed}
        heartbeat.phase("report", ("world",))
        record = step_record(step, metrics, world, peak)
        (record["memory_peak_bytes"],) = max_over_ranks([peak_memory_bytes(trainer.device)],
                                                        trainer.device)
        record.update(memory)
        if eval_due(train, step + 1):
            heartbeat.phase("eval")
            record["val_loss"] = validate()
        preempted = record.pop("stop_votes") > 0    # the same on every rank (trainer.py)
        record["checkpointed"] = _should_save(spec, step + 1) or preempted
        if record["checkpointed"]:
            heartbeat.phase("checkpoint", ("world",))
            # The last and the preemption save are waited for: the process exits next.
            background = spec.checkpoint_async and not preempted and step + 1 < train.steps
            save_start = time.perf_counter()
            state = trainer.checkpoint_state()
            state["meta"][STOP_SAVE_KEY] = preempted      # what a stopping driver waits for
            path = manager.save(step + 1, state, background=background)
            if not background:
                manager.flush()
            record["checkpoint_stall_s"] = time.perf_counter() - save_start
        for write in manager.finished_writes():   # the newest one, when several finished
            record["checkpoint_write_s"], record["checkpoint_write_step"] = write["write_s"], write["step"]
        record["preempted"] = preempted
        reporter.step(record)
        if preempted and step + 1 < train.steps:
            raise Preempted(step + 1, path)
    trainer.optimizer.wait_params()   # train.overlap_param_gather: the last step's gathers
    manager.flush()
    return record
