"""The job driver: check the run (durable paths, resumable or already complete), start or
join Ray and run the preflight, prepare data, open the MLflow run, launch the workers (Ray
Train or torchrun), follow their events, render the report, and end cleanly on success,
failure or SIGTERM/SIGINT with a summary table.

`python -m orchestrator.driver CONFIG.yaml [--set k=v ...]` is the `ray job submit`
entrypoint; it takes the same arguments as `foldmoe train`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field

import yaml

from engine.config.job import JobSpec
from workers.events import EventTail

from .config import ConfigError, RunConfig, add_config_arguments, flatten, load_config
from .errors import EXIT_CONFIG
from .observer import JobObserver
from .resume_checks import check_resumable, completed_step, latest_checkpoint_path
from .paths import durable_paths, in_ray_job
from .preflight import run_preflight
from .progress import ProgressDisplay
from .ray_output import RayOutputCapture
from .report_artifacts import log_report
from .signals import StopSignal, signal_of
from .stale_runs import write_driver_file
from .summary import already_complete_message, print_job_end, status_line, summary_rows
from .tracking import Tracker, resolve_tracking_uri, source_tags
from .watchdog import Watchdog

POLL_INTERVAL_S = 0.2
WORKER_EVENTS = "events.jsonl"           # rank 0: start, step
CONTROLLER_EVENTS = "controller.jsonl"   # Ray Train controller: failure
SPEC_FILE = "spec.json"
RAY_LOG = "ray.log"                      # Ray's own driver-side output (ray_output.py)


@dataclass
class JobResult:
    rc: int
    job_dir: str
    run_id: str | None = None
    tracking_uri: str | None = None
    summary: dict = field(default_factory=dict)
    error: str | None = None
    signaled: int | None = None
    complete: bool = False       # nothing to train: the newest checkpoint is at train.steps


# ------------------------------------------------------------------ preparation

def job_dir_for(run: RunConfig) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.abspath(os.path.join(run.schema.cluster.storage_path,
                                        f"{run.name}-{stamp}-{os.getpid()}"))


def prepare_data(run: RunConfig, progress: bool) -> str:
    """One-time token file per (source, tokenizer, max_bytes) under data.cache_dir."""
    from engine.data import TokenDataset, prepare_dataset
    from engine.data.eval_data import check_held_out_fits

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
        if run.train.eval_every:    # the held-out split fits (engine/data/eval_data.py)
            check_held_out_fits(prepared, run.train.seq_len, run.train.eval_batches, run.train.global_batch_size)
    except (ValueError, OSError) as err:
        raise ConfigError(f"data.source={d.source}: {err}") from None
    if dataset.vocab_size > run.model.vocab_size:
        raise ConfigError(f"model.vocab_size={run.model.vocab_size}: smaller than the tokenizer's "
                          f"vocabulary ({dataset.vocab_size}, data.tokenizer={d.tokenizer})")
    return prepared


def _entrypoint() -> tuple[str, str]:
    """(mlflow.source.name, the command line) of this driver process."""
    main = os.path.basename(sys.argv[0]) if sys.argv else ""
    name = {"foldmoe": "foldmoe train", "driver.py": "python -m orchestrator.driver",
            "cli.py": "python -m orchestrator.cli train"}.get(main, main or "python")
    return name, " ".join(shlex.quote(a) for a in sys.argv)


def _open_tracker(run: RunConfig, launcher: str, job_dir: str, progress: ProgressDisplay) -> Tracker | None:
    t = run.schema.tracking
    if not t.enabled:
        return None
    uri = resolve_tracking_uri(t.uri)
    entrypoint, command = _entrypoint()
    tags = source_tags(entrypoint, command, in_ray_job())
    tags.update({"foldmoe.launcher": launcher, "foldmoe.job_dir": job_dir,
                 "foldmoe.config_name": run.name})
    try:
        tracker = Tracker(uri, t.experiment, run.run_name, tags=tags, warn=progress.warn)
        tracker.report = t.report
    except Exception as err:  # noqa: BLE001 - any store failure means: do not start
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise ConfigError(f"tracking.uri={uri}: cannot open an MLflow run "
                          f"({type(err).__name__}: {first_line[:200]})") from None
    resolved = run.resolved()
    tracker.log_params(flatten(resolved))
    tracker.log_text(yaml.safe_dump(resolved, sort_keys=False), "config.yaml")
    tracker.start_system_metrics()
    write_driver_file(job_dir, tracker.run_id, uri)
    return tracker


def _auto_choice(run: RunConfig):
    """parallel.auto: world size -> the planner's row (orchestrator/planning.py), else None."""
    if not run.schema.parallel.auto:
        return None
    from .planning import auto_layout
    return lambda world: auto_layout(run, world)[1]


def write_spec(spec: JobSpec) -> str:
    """<job_dir>/spec.json: what every worker reads (torchrun) and what ran (records)."""
    spec_path = os.path.join(spec.job_dir, SPEC_FILE)
    with open(spec_path, "w", encoding="utf-8") as handle:
        handle.write(spec.to_json())
    return spec_path


def _make_launcher(kind: str, run: RunConfig, job_dir: str):
    """The worker group; it gets its JobSpec (`.spec`) once the data is prepared."""
    spec_path = os.path.join(job_dir, SPEC_FILE)
    if kind == "torchrun":
        from .torchrun_launcher import TorchrunLauncher
        return TorchrunLauncher(run, spec_path, os.path.join(job_dir, "torchrun.log"),
                                os.path.join(job_dir, CONTROLLER_EVENTS))
    from .ray_launcher import RayLauncher
    return RayLauncher(run, None, job_dir, os.path.join(job_dir, CONTROLLER_EVENTS))


# ------------------------------------------------------------------ the job

def run_training(run: RunConfig, *, launcher: str = "ray", metrics_jsonl: str | None = None,
                 live_progress: bool | None = None, driver_start: float | None = None,
                 capture_ray_output: bool = True) -> JobResult:
    """Runs the job to completion; returns its exit code and figures (never raises for a
    training failure). ConfigError (PreflightError) is raised for problems found before
    any worker starts; nothing of the job is left running then."""
    driver_start = driver_start or time.time()
    run = durable_paths(run)
    checkpoint_dir = os.path.abspath(run.checkpoint_dir)
    reshard_note = check_resumable(run, checkpoint_dir)
    if reshard_note:
        print(reshard_note, flush=True)
    complete = completed_step(run, checkpoint_dir)
    if complete is not None:
        print(already_complete_message(*complete, run.train.steps), flush=True)
        return JobResult(rc=0, job_dir="", complete=True)
    progress = ProgressDisplay(run.train.steps, live=live_progress)
    job_dir = job_dir_for(run)
    os.makedirs(job_dir, exist_ok=True)
    spec = {"data_dir": None, "job_dir": job_dir,
            "checkpoint_dir": checkpoint_dir, "events_path": os.path.join(job_dir, WORKER_EVENTS)}
    worker_group = _make_launcher(launcher, run, job_dir)
    capture = (RayOutputCapture(os.path.join(job_dir, RAY_LOG))
               if launcher == "ray" and capture_ray_output else None)
    stop = StopSignal()
    stop.install()
    try:
        if capture is not None:
            capture.start()
            progress.stderr = capture.terminal_stderr
        result = _start_and_run(run, launcher, worker_group, spec, progress, stop, metrics_jsonl,
                                driver_start, capture)
    finally:
        progress.stop()
        stop.restore()
        if capture is not None:
            capture.stop()
    if result.error:
        print(f"error: {result.error}", file=sys.stderr, flush=True)
    return result


def _start_and_run(run: RunConfig, launcher: str, worker_group, spec: dict,
                   progress: ProgressDisplay, stop: StopSignal, metrics_jsonl: str | None,
                   driver_start: float, capture) -> JobResult:
    try:
        tracker = _connect_and_check(run, launcher, worker_group, spec, progress, capture)
    except (KeyboardInterrupt, SystemExit) as err:     # stopped before any worker started
        return _stopped_early(spec["job_dir"], signal_of(err))
    stop.install()     # ray.init() replaced the SIGTERM handler
    if stop.signum is not None:                        # a signal while preparing
        if tracker:
            tracker.finish("KILLED")
        worker_group.close()
        return _stopped_early(spec["job_dir"], stop.signum)
    return _run_job(run, worker_group, tracker, spec["job_dir"], spec, progress, stop,
                    metrics_jsonl, driver_start, capture)


def _stopped_early(job_dir: str, signum: int) -> JobResult:
    name = signal.Signals(signum).name
    return JobResult(rc=128 + signum, job_dir=job_dir, signaled=signum,
                     error=f"stopped by {name} before any worker started")


def _connect_and_check(run: RunConfig, launcher: str, worker_group, spec: dict,
                       progress: ProgressDisplay, capture) -> Tracker | None:
    """Connects to (or starts) Ray and runs the preflight (first: it answers in seconds),
    prepares the data, opens the MLflow run; on a refusal stops what it started and
    re-raises (the CLI prints the one line, exit 2)."""
    try:
        if worker_group.connect_phase:
            progress.phase(worker_group.connect_phase)
        worker_group.connect()
        if capture is not None:
            capture.route_ray_loggers()
        progress.phase("preflight")
        for warning in run_preflight(run, worker_group.supply()):
            progress.warn(warning)
        progress.phase("prepare data")
        spec["data_dir"] = prepare_data(run, progress=progress.live)
        worker_group.spec = run.job_spec(**spec)    # what the workers get (engine/config/job.py)
        write_spec(worker_group.spec)
        if run.schema.tracking.enabled:
            progress.phase("open the MLflow run")
        tracker = _open_tracker(run, launcher, spec["job_dir"], progress)
        progress.end_phase()
        return tracker
    except BaseException:
        progress.stop()
        worker_group.close()
        raise


def _run_job(run: RunConfig, worker_group, tracker: Tracker | None, job_dir: str, spec: dict,
             progress: ProgressDisplay, stop: StopSignal, metrics_jsonl: str | None,
             driver_start: float, capture) -> JobResult:
    from .plan import plan_for      # engine code (torch): after the preflight

    result = JobResult(rc=1, job_dir=job_dir, run_id=tracker.run_id if tracker else None,
                       tracking_uri=tracker.uri if tracker else None)
    observer = JobObserver(total_steps=run.train.steps, tracker=tracker, progress=progress,
                           metrics_jsonl=metrics_jsonl, driver_start=driver_start,
                           layout_groups=run.layout_table, plan=plan_for(run),
                           sinks=worker_group.sinks(os.path.basename(job_dir), run.name),
                           auto_choice=_auto_choice(run))
    try:
        progress.phase("place workers")
        worker_group.start()
        stop.install()
        tails = [EventTail(os.path.join(job_dir, CONTROLLER_EVENTS)), EventTail(spec["events_path"]),
                 Watchdog.for_run(run, job_dir)]    # hangs and stragglers, from the heartbeats
        rc = _follow(worker_group, tails, observer, stop, progress, capture)
        _finish(result, rc, stop.signum, worker_group, observer, tracker, progress, job_dir)
    except BaseException as err:  # noqa: BLE001 - every exit path ends the MLflow run
        result.error = f"{type(err).__name__}: {err}"
        _finish(result, 1, stop.signum or signal_of(err), worker_group, observer, tracker,
                progress, job_dir)
    progress.end_phase()
    if result.signaled is None:
        newest = latest_checkpoint_path(spec["checkpoint_dir"])
        rows = summary_rows(result.summary, total_steps=run.train.steps,
                            checkpoint_dir=spec["checkpoint_dir"], newest_checkpoint=newest,
                            job_dir=job_dir, mlflow_link=tracker.link if tracker else None,
                            ray_errors=capture.error_summary() if capture else None)
        progress.stop()
        print_job_end(progress, result.rc, result.summary, rows, None)
    else:
        print(status_line(result.rc, result.summary), flush=True)
    return result


def _follow(worker_group, tails: list[EventTail], observer: JobObserver, stop: StopSignal,
            progress: ProgressDisplay, capture) -> int | None:
    """Feeds events to the observer until the workers exit (their rc) or a signal (None).

    A failure is written before Ray Train starts the next worker group, so reading the
    controller's file first keeps failures ahead of the new group's steps."""
    def drain() -> None:
        for tail in tails:
            for event in tail.read():
                observer.handle(event)
                if capture is not None and event.get("type") in ("placed", "failure"):
                    capture.route_ray_loggers()    # Ray Train added its handlers by now

    while True:
        drain()
        if stop.signum is not None:
            return None
        if observer.fatal_error:     # a retry would fail the same way: end the job now
            return 1
        rc = worker_group.poll()
        if rc is not None:
            drain()
            return rc
        placing = "place workers" in (progress.current_phase or "")
        progress.tick(worker_group.waiting_for if placing else None)
        time.sleep(POLL_INTERVAL_S)


def _finish(result: JobResult, rc: int | None, signum: int | None, worker_group,
            observer: JobObserver, tracker: Tracker | None, progress: ProgressDisplay,
            job_dir: str) -> None:
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
        result.error = result.error or observer.fatal_error or getattr(worker_group, "error", None)
        if result.rc != 0 and observer.hang_cause():    # the watchdog's line first
            result.error = f"{observer.hang_cause()}\n{result.error or ''}".rstrip()
        progress.close_bar()
        observer.close()
        worker_group.close()
        summary = observer.summary()
        if tracker:
            for key in ("time_to_first_step_s", "job_time_s"):
                if summary[key] is not None:
                    tracker.log_metric(f"job/{key}", summary[key], step=0)
            if summary["steps_seen"] and tracker.report:
                progress.phase("render the report")
                if tracker.flush():            # the report reads the run back
                    log_report(tracker, job_dir, progress.warn)
                else:
                    progress.warn("warning: the run's report was not rendered (MLflow unreachable)")
                progress.end_phase()
            tracker.finish("FINISHED" if result.rc == 0 else "FAILED")
    result.summary = observer.summary()


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics-jsonl", help="append one JSON object per step to this file")
    parser.add_argument("--launcher", choices=("ray", "torchrun"), default="ray")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                        help="resume from the newest complete checkpoint in checkpoint.dir "
                             "(default: checkpoint.resume, true); --no-resume starts at step 0")


def train_command(run: RunConfig, args: argparse.Namespace, driver_start: float) -> int:
    from .memory_report import check_fits

    check_fits(run)   # the memory model refuses a config that cannot fit, before anything starts
    result = run_training(run, launcher=args.launcher, metrics_jsonl=args.metrics_jsonl,
                          driver_start=driver_start)
    if result.signaled is not None:
        # Stop within seconds: skip interpreter/Ray teardown; tracking is already flushed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(result.rc)
    return result.rc


def run_train_args(args: argparse.Namespace, driver_start: float) -> int:
    """`foldmoe train` from parsed arguments; a refused config is one line and exit 2."""
    try:
        overrides = list(args.overrides)
        if args.resume is not None:
            overrides.append(f"checkpoint.resume={'true' if args.resume else 'false'}")
        return train_command(load_config(args.config, overrides), args, driver_start)
    except ConfigError as err:
        print(f"{err.kind}: {err}", file=sys.stderr)
        return EXIT_CONFIG


def main(argv: list[str] | None = None) -> int:
    """`python -m orchestrator.driver CONFIG [...]`, the entrypoint for `ray job submit`:
    the same as `foldmoe train CONFIG [...]`."""
    driver_start = time.time()
    parser = argparse.ArgumentParser(prog="python -m orchestrator.driver",
                                     description="run a foldmoe training job (= foldmoe train)")
    add_config_arguments(parser)
    add_train_arguments(parser)
    return run_train_args(parser.parse_args(argv), driver_start)


if __name__ == "__main__":
    sys.exit(main())
