"""`foldmoe eval CONFIG [--set ...] [--tokens FILE.jsonl] [--json] [--launcher inline|torchrun|ray]`:
the forward-only mean token loss and perplexity of a run's weights, in the run's layout.

Weights: the newest complete checkpoint in checkpoint.dir (any layout, resharded on load),
else model.init_from; neither is a one-line config error. Data: the rows of --tokens, else
the held-out split of the prepared data (train.eval_batches global batches; the split is
defined in engine/data/eval_data.py), the same batches as the `val_loss` of training.
Output: one line, and with --json a last line `{"loss": L, "tokens": N, "perplexity": P}`.

Launchers: `inline` runs in the processes this command was started in: one process, or
every rank of `torchrun ... -m orchestrator.cli eval ...` (rank 0 prints); `torchrun` starts
cluster.num_workers processes on this machine like `foldmoe train --launcher torchrun`; `ray`
runs them as a Ray Train worker group like `foldmoe train` (joins $RAY_ADDRESS or this
process's Ray, else starts a local one; Ray's output goes to <job_dir>/ray.log).
Default: inline for one worker or inside a torchrun world, else ray (train's default).
"""
from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import os
import sys
import time

from .config import RunConfig, add_config_arguments, load_config
from .errors import EXIT_CONFIG, ConfigError
from .memory_report import check_eval_fits

POLL_INTERVAL_S = 0.2


class EvalError(ConfigError):
    kind = "eval error"


class EvalFailed(RuntimeError):
    """The launched workers failed (exit 1, one line naming their log)."""


def add_eval_parser(sub) -> None:
    parser = sub.add_parser("eval", help="forward-only loss and perplexity of the newest checkpoint "
                                         "(or model.init_from) on the held-out split or a tokens file")
    add_config_arguments(parser)
    parser.add_argument("--tokens", metavar="FILE.jsonl", default=None,
                        help='rows of {"input_ids": [...]} (default: the held-out split of the data)')
    parser.add_argument("--json", action="store_true",
                        help='last line of stdout: {"loss": L, "tokens": N, "perplexity": P}')
    parser.add_argument("--launcher", choices=("inline", "torchrun", "ray"), default=None,
                        help="inline: in this process (or this torchrun world); torchrun / ray: "
                             "start cluster.num_workers workers like `foldmoe train` "
                             "(default: inline for 1 worker, else ray)")


def eval_command(args: argparse.Namespace) -> int:
    try:
        run = load_config(args.config, list(args.overrides) + ["checkpoint.resume=true"])
        inline = args.launcher == "inline" or (args.launcher is None and (
            "WORLD_SIZE" in os.environ or run.world_sizes[-1] == 1))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if inline and world not in run.world_sizes:
            raise ConfigError(f"cluster.num_workers={run.schema.cluster.num_workers}: --launcher inline "
                              f"runs in this world of {world} process(es); set it to {world}")
        for size in [world] if inline else run.world_sizes:
            check_eval_fits(run, size)     # in seconds, before data or weights are read
        spec = _job_spec(run, args.tokens)
        result = _run_inline(spec) if inline else _run_launched(run, spec, args.launcher or "ray")
    except ConfigError as err:
        print(f"{err.kind}: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except EvalFailed as err:
        print(f"eval error: {err}", file=sys.stderr)
        return 1
    if result is None:          # a rank other than 0 of an inline torchrun world
        return 0
    source = args.tokens or f"held-out split ({run.train.eval_batches} batches)"
    print(f"loss {result['loss']:.6f}  perplexity {result['perplexity']:.4f}  over "
          f"{result['tokens']} tokens of {source}; weights: {result['weights']}", flush=True)
    if args.json:
        print(json.dumps({k: result[k] for k in ("loss", "tokens", "perplexity")}), flush=True)
    return 0


def _job_spec(run: RunConfig, tokens: str | None):
    """The eval JobSpec; refuses missing weights, another model's checkpoint and bad rows."""
    from .resume_checks import check_resumable, latest_checkpoint_path

    checkpoint_dir = os.path.abspath(run.checkpoint_dir)
    if latest_checkpoint_path(checkpoint_dir) is None and run.init_from is None:
        raise ConfigError(f"checkpoint.dir={checkpoint_dir}: no complete checkpoint and no "
                          "model.init_from: nothing to evaluate")
    note = check_resumable(run, checkpoint_dir)
    if note:
        print(note, file=sys.stderr, flush=True)
    if tokens is not None:
        from engine.data.eval_data import EvalDataError, read_token_rows
        tokens = os.path.abspath(tokens)
        try:
            read_token_rows(tokens, run.model.vocab_size, run.train.seq_len)
        except EvalDataError as err:
            raise EvalError(str(err)) from None
        data_dir = ""
    else:
        from .driver import prepare_data
        data_dir = prepare_data(run, progress=False)
        check_held_out(run, data_dir)
    spec = run.job_spec(job_dir="", data_dir=data_dir, checkpoint_dir=checkpoint_dir, events_path="")
    return dataclasses.replace(spec, task="eval", eval_tokens=tokens)


def check_held_out(run: RunConfig, data_dir: str) -> None:
    """The held-out split fits the prepared data (else a one-line config error)."""
    from engine.data.eval_data import EvalDataError, held_out_batches

    t = run.train
    try:
        held_out_batches(data_dir, t.seq_len, t.eval_batches, t.global_batch_size)
    except EvalDataError as err:
        raise ConfigError(f"train.eval_batches={t.eval_batches}: {err}") from None


def _run_inline(spec) -> dict | None:
    """run_eval in this process's world (started here as one process unless torchrun did)."""
    import torch.distributed as dist

    from workers.eval_worker import run_eval

    backend = "nccl" if spec.use_gpu else "gloo"
    if "WORLD_SIZE" in os.environ:
        # torchrun's world: joined once and kept (a re-init on its store does not connect),
        # and left at exit.
        if not dist.is_initialized():
            dist.init_process_group(backend)
            atexit.register(_leave_world)
        result = run_eval(spec)
        return result if dist.get_rank() == 0 else None
    started = not dist.is_initialized()
    if started:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        return run_eval(spec)
    finally:
        if started:
            dist.destroy_process_group()


def _leave_world() -> None:
    """Destroys the process groups before the interpreter tears down: left to exit, gloo's
    threads of a rank that finished first may still be running (std::terminate, SIGABRT)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _run_launched(run: RunConfig, spec, kind: str) -> dict:
    """Starts the worker group with the driver's launcher (`kind`: torchrun or ray) and reads
    rank 0's "eval" event from the job's event file (as training's events are read)."""
    from workers.events import EventTail

    from .driver import RAY_LOG, _make_launcher, job_dir_for, write_spec
    from .ray_output import RayOutputCapture

    job_dir = job_dir_for(run) + "-eval"
    os.makedirs(job_dir)
    spec = dataclasses.replace(spec, job_dir=job_dir, events_path=os.path.join(job_dir, "events.jsonl"))
    launcher = _make_launcher(kind, run, job_dir)
    log_path = getattr(launcher, "log_path", os.path.join(job_dir, RAY_LOG))
    capture = RayOutputCapture(log_path) if kind == "ray" else None
    if capture is not None:
        capture.start()
    try:
        launcher.connect()
        launcher.spec = spec
        write_spec(spec)
        launcher.start()
        while (rc := launcher.poll()) is None:
            time.sleep(POLL_INTERVAL_S)
    finally:
        launcher.close()
        if capture is not None:
            capture.stop()
    found = [e for e in EventTail(spec.events_path).read() if e.get("type") == "eval"]
    if rc != 0 or not found:
        error = (launcher.error or f"the workers exited with {rc} and wrote no result").splitlines()
        raise EvalFailed(f"{error[0]} (log: {log_path}){_last_error(error)}")
    return found[-1]


def _last_error(lines: list[str]) -> str:
    """The last exception line of the workers' log, if any (kept on the one line)."""
    errors = [line.strip() for line in lines if "Error" in line]
    return f": {errors[-1][:300]}" if errors else ""
