"""The job driver: prepare data, open the MLflow run, launch the workers (Ray Train or
torchrun), follow their events, and end cleanly on success, failure or SIGTERM/SIGINT.

`python -m orchestrator.driver CONFIG.yaml [--set k=v ...]` is the `ray job submit`
entrypoint; it takes the same arguments as `foldmoe train`.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import yaml

from .config import ConfigError, RunConfig, flatten
from .events import EventTail
from .observer import JobObserver
from .progress import ProgressDisplay
from .tracking import Tracker, resolve_tracking_uri

POLL_INTERVAL_S = 0.2
WORKER_EVENTS = "events.jsonl"           # rank 0: start, step
CONTROLLER_EVENTS = "controller.jsonl"   # Ray Train controller: failure


@dataclass
class JobResult:
    rc: int
    job_dir: str
    run_id: str | None = None
    tracking_uri: str | None = None
    summary: dict = field(default_factory=dict)
    error: str | None = None
    signaled: int | None = None


class StopSignal:
    """SIGTERM/SIGINT set a flag that the driver loop checks every POLL_INTERVAL_S."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Call again after ray.init(), which replaces the SIGTERM handler with sys.exit."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)

    def _handle(self, signum, _frame) -> None:
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# ------------------------------------------------------------------ preparation

def job_dir_for(run: RunConfig) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.abspath(os.path.join(run.schema.cluster.storage_path,
                                        f"{run.name}-{stamp}-{os.getpid()}"))


def prepare_data(run: RunConfig, progress: bool) -> str:
    """One-time token file per (source, tokenizer, max_bytes) under data.cache_dir."""
    from engine.data import TokenDataset, prepare_dataset

    d = run.schema.data
    source = d.source if d.source == "stdlib" else os.path.abspath(d.source)
    tokenizer = d.tokenizer if d.tokenizer == "byte" else os.path.abspath(d.tokenizer)
    key = json.dumps([source, tokenizer, d.max_bytes]).encode()
    slug = "stdlib" if source == "stdlib" else os.path.basename(source.rstrip("/")) or "data"
    out_dir = os.path.join(os.path.abspath(d.cache_dir),
                           f"{slug}-{hashlib.sha256(key).hexdigest()[:12]}")
    try:
        prepared = prepare_dataset(source, out_dir, tokenizer, max_bytes=d.max_bytes,
                                   progress=progress)
        dataset = TokenDataset(prepared, run.train.seq_len)
    except (ValueError, OSError) as err:
        raise ConfigError(f"data.source={d.source}: {err}") from None
    if dataset.vocab_size > run.model.vocab_size:
        raise ConfigError(f"model.vocab_size={run.model.vocab_size}: smaller than the tokenizer's "
                          f"vocabulary ({dataset.vocab_size}, data.tokenizer={d.tokenizer})")
    return prepared


def check_resumable(run: RunConfig, checkpoint_dir: str) -> None:
    """Refuses, before anything starts, to resume a checkpoint of another world size or layout."""
    from engine.checkpoint import describe_layout_diff, latest_checkpoint
    from engine.checkpoint.manager import MANIFEST
    from engine.train.state import layout_of_config

    latest = latest_checkpoint(checkpoint_dir)
    if not run.schema.checkpoint.resume or run.elastic or latest is None:
        return
    with open(os.path.join(latest, MANIFEST), encoding="utf-8") as handle:
        manifest = json.load(handle)
    world = run.world_sizes[0]
    current = layout_of_config(run.parallel(world))
    if manifest.get("layout") != current:
        raise ConfigError(
            f"checkpoint.dir={checkpoint_dir}: its latest checkpoint (step {manifest.get('step')}) "
            f"has another layout ({describe_layout_diff(manifest.get('layout'), current)}); "
            "resuming with a different world size or layout is not supported yet: use the "
            "same layout, another checkpoint.dir, or checkpoint.resume=false")


def _open_tracker(run: RunConfig, launcher: str, job_dir: str) -> Tracker | None:
    t = run.schema.tracking
    if not t.enabled:
        return None
    uri = resolve_tracking_uri(t.uri)
    try:
        tracker = Tracker(uri, t.experiment, run.run_name,
                          tags={"foldmoe.launcher": launcher, "foldmoe.job_dir": job_dir,
                                "foldmoe.config_name": run.name})
    except Exception as err:  # noqa: BLE001 - any store failure means: do not start
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise ConfigError(f"tracking.uri={uri}: cannot open an MLflow run "
                          f"({type(err).__name__}: {first_line[:200]})") from None
    resolved = run.resolved()
    tracker.log_params(flatten(resolved))
    tracker.log_text(yaml.safe_dump(resolved, sort_keys=False), "config.yaml")
    return tracker


def _auto_choice(run: RunConfig):
    """parallel.auto: world size -> the planner's row (orchestrator/plan.py), else None."""
    if not run.schema.parallel.auto:
        return None
    from .plan import auto_layout
    return lambda world: auto_layout(run, world)[1]


def _make_launcher(kind: str, run: RunConfig, spec: dict, job_dir: str):
    spec_path = os.path.join(job_dir, "spec.json")
    with open(spec_path, "w", encoding="utf-8") as handle:
        json.dump(spec, handle, indent=1)
    if kind == "torchrun":
        from .torchrun_launcher import TorchrunLauncher
        return TorchrunLauncher(run, spec_path, os.path.join(job_dir, "torchrun.log"))
    from .ray_launcher import RayLauncher
    return RayLauncher(run, spec, job_dir, os.path.join(job_dir, CONTROLLER_EVENTS))


# ------------------------------------------------------------------ the job

def run_training(run: RunConfig, *, launcher: str = "ray", metrics_jsonl: str | None = None,
                 live_progress: bool | None = None, driver_start: float | None = None) -> JobResult:
    """Runs the job to completion; returns its exit code and figures (never raises for a
    training failure). ConfigError is raised for problems found before anything starts."""
    driver_start = driver_start or time.time()
    job_dir = job_dir_for(run)
    checkpoint_dir = os.path.abspath(run.checkpoint_dir)
    check_resumable(run, checkpoint_dir)
    progress = ProgressDisplay(run.train.steps, live=live_progress)
    data_dir = prepare_data(run, progress=progress.live)
    os.makedirs(job_dir, exist_ok=True)
    events_path = os.path.join(job_dir, WORKER_EVENTS)
    spec = {"config": run.resolved(), "data_dir": data_dir, "job_dir": job_dir,
            "checkpoint_dir": checkpoint_dir, "events_path": events_path}
    tracker = _open_tracker(run, launcher, job_dir)
    result = JobResult(rc=1, job_dir=job_dir, run_id=tracker.run_id if tracker else None,
                       tracking_uri=tracker.uri if tracker else None)
    observer = JobObserver(total_steps=run.train.steps, tracker=tracker, progress=progress,
                           metrics_jsonl=metrics_jsonl, driver_start=driver_start,
                           layout_groups=run.layout_table, auto_choice=_auto_choice(run))
    worker_group = _make_launcher(launcher, run, spec, job_dir)
    stop = StopSignal()
    stop.install()
    progress.start()
    try:
        worker_group.start()
        stop.install()
        tails = [EventTail(os.path.join(job_dir, CONTROLLER_EVENTS)), EventTail(events_path)]
        rc = _follow(worker_group, tails, observer, stop)
        _finish(result, rc, stop.signum, worker_group, observer, tracker)
    except BaseException as err:  # noqa: BLE001 - every exit path ends the MLflow run
        result.error = f"{type(err).__name__}: {err}"
        _finish(result, 1, stop.signum or _signal_of(err), worker_group, observer, tracker)
    finally:
        progress.stop()
        stop.restore()
    _print_summary(result, run)
    return result


def _follow(worker_group, tails: list[EventTail], observer: JobObserver,
            stop: StopSignal) -> int | None:
    """Feeds events to the observer until the workers exit (their rc) or a signal (None).

    A failure is written before Ray Train starts the next worker group, so reading the
    controller's file first keeps failures ahead of the new group's steps."""
    def drain() -> None:
        for tail in tails:
            for event in tail.read():
                observer.handle(event)

    while True:
        drain()
        if stop.signum is not None:
            return None
        rc = worker_group.poll()
        if rc is not None:
            drain()
            return rc
        time.sleep(POLL_INTERVAL_S)


def _signal_of(err: BaseException) -> int | None:
    """A signal that arrived as an exception: Ctrl-C, or SIGTERM while Ray's own handler
    (sys.exit(15), installed by ray.init) was still in place."""
    if isinstance(err, KeyboardInterrupt):
        return signal.SIGINT
    if isinstance(err, SystemExit):
        return signal.SIGTERM
    return None


def _finish(result: JobResult, rc: int | None, signum: int | None, worker_group,
            observer: JobObserver, tracker: Tracker | None) -> None:
    if signum is not None:
        # Flush tracking first: the caller may exit hard right after this returns.
        if tracker:
            tracker.finish("KILLED")
        observer.close()
        worker_group.stop()
        result.rc, result.signaled = 128 + signum, signum
        result.error = result.error or f"stopped by {signal.Signals(signum).name}"
    else:
        result.rc = rc if rc is not None else 1
        result.error = result.error or getattr(worker_group, "error", None)
        summary = observer.summary()
        if tracker:
            for key in ("time_to_first_step_s", "job_time_s"):
                if summary[key] is not None:
                    tracker.log_metric(key, summary[key], step=0)
            tracker.finish("FINISHED" if result.rc == 0 else "FAILED")
        observer.close()
        worker_group.close()
    result.summary = observer.summary()


def _print_summary(result: JobResult, run: RunConfig) -> None:
    s = result.summary
    status = "finished" if result.rc == 0 else f"failed (exit {result.rc})"
    first = s.get("time_to_first_step_s")
    loss = s.get("final_loss")
    print(f"job {status}: {s.get('steps_seen', 0)} steps reported, final loss "
          f"{loss if loss is None else f'{loss:.4f}'}, time to first step "
          f"{'n/a' if first is None else f'{first:.1f}s'}, job time {s.get('job_time_s', 0):.1f}s, "
          f"restarts {s.get('restarts', 0)}", flush=True)
    if result.run_id:
        print(f"MLflow run {result.run_id} at {result.tracking_uri}", flush=True)
    print(f"job dir {result.job_dir}; checkpoints in {os.path.abspath(run.checkpoint_dir)}",
          flush=True)
    if result.error:
        print(f"error: {result.error}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    from .cli import main as cli_main

    argv = sys.argv[1:] if argv is None else argv
    return cli_main(["train", *argv])


if __name__ == "__main__":
    sys.exit(main())
