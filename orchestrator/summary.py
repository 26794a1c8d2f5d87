"""What the driver prints when a job ends: one status line, then a short table (steps,
tokens, tokens/s, MFU, restarts and recovery time, where the checkpoints, the MLflow run
and the job's logs are), and the messages for a run that has nothing left to do."""
from __future__ import annotations

import os
import sys

from .progress import ProgressDisplay


def status_line(rc: int, summary: dict) -> str:
    status = "finished" if rc == 0 else f"failed (exit {rc})"
    first, loss = summary.get("time_to_first_step_s"), summary.get("final_loss")
    return (f"job {status}: {summary.get('steps_seen', 0)} steps reported, final loss "
            f"{loss if loss is None else f'{loss:.4f}'}, time to first step "
            f"{'n/a' if first is None else f'{first:.1f}s'}, job time "
            f"{summary.get('job_time_s', 0):.1f}s, restarts {summary.get('restarts', 0)}")


def summary_rows(summary: dict, *, total_steps: int, checkpoint_dir: str, newest_checkpoint: str | None,
                 job_dir: str, mlflow_link: str | None, ray_errors: str | None) -> list[tuple[str, str]]:
    s = summary
    start = s.get("resumed_from_step") or 0
    last = s.get("last_step")
    steps = (f"{start} -> {last + 1} of {total_steps} ({s.get('steps_seen', 0)} reported)"
             if last is not None else f"none of {total_steps}")
    rows = [("steps", steps), ("tokens", f"{s.get('tokens', 0):,.0f}")]
    if s.get("tokens_per_s") is not None:
        rows.append(("tokens/s", f"{s['tokens_per_s']:,.0f} (median, first step of each group excluded)"))
    if s.get("mfu") is not None:
        peak = (s.get("peak_flops_source") or "").split(" (")[0]
        rows.append(("MFU", f"{100 * s['mfu']:.2f}% (median; {peak})"))
    rows.append(("restarts", restarts_text(s)))
    for message in s.get("checkpoint_fallbacks") or []:
        rows.append(("checkpoint fallback", message.removeprefix("warning: ")))
    first = s.get("time_to_first_step_s")
    rows.append(("time", f"first step after {'n/a' if first is None else f'{first:.1f} s'}, "
                         f"job {s.get('job_time_s', 0):.1f} s"))
    newest = os.path.basename(newest_checkpoint) if newest_checkpoint else "none yet"
    rows.append(("checkpoints", f"{checkpoint_dir} (newest: {newest})"))
    rows.append(("MLflow", mlflow_link or "tracking disabled"))
    rows.append(("job dir", job_dir))
    if ray_errors:
        rows.append(("Ray errors", ray_errors))
    return rows


def restarts_text(s: dict) -> str:
    """'2 (3 worker groups, 2 failures; recovery 14.2 s, 15.0 s)': restarts = group starts - 1."""
    text = f"{s.get('restarts', 0)}"
    groups, failures = s.get("group_starts"), s.get("failures")
    details = []
    if groups is not None:
        details.append(f"{groups} worker group{'s' if groups != 1 else ''}, "
                       f"{failures or 0} failure{'s' if failures != 1 else ''}")
    recovery = s.get("recovery_s") or []
    if recovery:
        details.append("recovery " + ", ".join(f"{r:.1f} s" for r in recovery))
    sizes = s.get("world_sizes") or []
    if len(set(sizes)) > 1:     # elastic: the group shrank or grew
        details.append("world size " + " -> ".join(map(str, sizes)))
    return text + (f" ({'; '.join(details)})" if details else "")


def print_job_end(progress: ProgressDisplay, rc: int, summary: dict, rows: list[tuple[str, str]],
                  error: str | None) -> None:
    print(status_line(rc, summary), flush=True)
    progress.table("job summary", rows)
    if error:
        print(f"error: {error}", file=sys.stderr, flush=True)


def already_complete_message(checkpoint: str, step: int, total_steps: int) -> str:
    past = "at" if step == total_steps else "past"
    return (f"already complete: the newest checkpoint {checkpoint} is {past} train.steps={total_steps} "
            f"(step {step}); nothing to train, no MLflow run opened. To train further raise "
            f"train.steps (--set train.steps={2 * total_steps}); to start over use another "
            "checkpoint.dir, or --no-resume (checkpoint.resume=false)")
