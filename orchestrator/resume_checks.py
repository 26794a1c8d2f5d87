"""What the driver checks about the checkpoint directory before anything starts, with the
same walk-back as the workers (engine/checkpoint/fallback.py): a newest checkpoint that
fails verification (malformed or edited manifest, truncated or missing file, rank files
that do not match their hashes) is moved to quarantine/ with a warning and the next older
one is checked; one of another model is refused in one line; one of another layout is
resharded on load, said before the start; a run whose newest verified checkpoint is at
train.steps is already complete. Elastic runs get the same checks.

The driver verifies everything except the SHA-256 of the tensor files, which the ranks
hash in parallel as they read them (hashing a multi-TB checkpoint on one machine before
every start would cost minutes); a tensor file that fails there makes the workers walk
back the same way, and the driver shows their decision. The one exception is a run that
would stop as already complete: its checkpoint is hashed in full first. Reads only JSON
and file sizes otherwise: no torch import before the preflight for a first run."""
from __future__ import annotations

import os
import sys
from typing import Callable

from .config import RunConfig
from .errors import ConfigError

Warn = Callable[[str], None]


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def latest_checkpoint_path(checkpoint_dir: str) -> str | None:
    from engine.checkpoint import latest_checkpoint

    return latest_checkpoint(checkpoint_dir)


def _walk(checkpoint_dir: str, try_load, warn: Warn):
    """load_newest_verified in the driver; its refusals become one-line config errors."""
    from engine.checkpoint import CheckpointError
    from engine.checkpoint.fallback import load_newest_verified

    try:
        return load_newest_verified(checkpoint_dir, try_load, warn=warn)
    except CheckpointError as err:
        raise ConfigError(f"checkpoint.dir={checkpoint_dir}: {err}") from None


def _same_model(run: RunConfig, verify):
    """try_load for the driver: `verify`, then the saved model must be the configured one."""
    from engine.checkpoint import CheckpointError
    from engine.config.model import shape_differences

    def try_load(path: str):
        manifest, meta = verify(path)
        differences = shape_differences(meta.get("model") or {}, run.model)
        if differences:
            raise CheckpointError(
                f"its checkpoint {os.path.basename(path)} (step {manifest['step']}) holds another "
                f"model ({differences}, saved vs this config); use the same model, another "
                "checkpoint.dir, or checkpoint.resume=false")
        return manifest, meta
    return try_load


def check_resumable(run: RunConfig, checkpoint_dir: str, warn: Warn = _to_stderr) -> str | None:
    """Before anything starts: walks back past checkpoints that fail verification (moved to
    quarantine/), refuses one of another model (one line), and says when the one to resume
    has another world size or layout and will be resharded on load."""
    if not os.path.isdir(checkpoint_dir) or not run.schema.checkpoint.resume:
        return None     # a first run: no checkpoint, and no torch import before the preflight
    from engine.checkpoint import describe_layout_diff
    from engine.checkpoint.fallback import verify_structure
    from engine.train.state import layout_of_config

    found = _walk(checkpoint_dir, _same_model(run, verify_structure), warn)
    if found is None:
        return None
    manifest, meta = found[1]
    _check_data(run, meta.get("data") or {}, manifest, warn)
    current = layout_of_config(run.parallel(run.world_sizes[-1]))
    if run.elastic or manifest["layout"] == current:
        return None
    return (f"resharding the checkpoint of step {manifest['step']} on load: "
            f"{describe_layout_diff(manifest['layout'], current)}")


def completed_step(run: RunConfig, checkpoint_dir: str, warn: Warn = _to_stderr) -> tuple[str, int] | None:
    """(newest verified checkpoint, its step) when resuming it would leave nothing to train;
    that checkpoint is hashed in full first, since nothing else would read it."""
    if not os.path.isdir(checkpoint_dir) or not run.schema.checkpoint.resume:
        return None
    from engine.checkpoint import complete_checkpoints
    from engine.checkpoint.fallback import verify_everything

    found = complete_checkpoints(checkpoint_dir)
    if not found or found[-1][0] < run.train.steps:
        return None
    verified = _walk(checkpoint_dir, _same_model(run, verify_everything), warn)
    if verified is None or int(verified[1][0]["step"]) < run.train.steps:
        return None
    return verified[0], int(verified[1][0]["step"])


def _check_data(run: RunConfig, saved: dict, manifest: dict, warn: Warn) -> None:
    """The data of the resumed run (engine/data/position.py): an evaluation split reaching
    into trained windows is refused; a changed batch size or order is said."""
    from engine.data.position import DataContinuityError, resume_position

    try:
        position = resume_position(saved, int(manifest["step"]), run.train, 0, None)
    except DataContinuityError as err:
        raise ConfigError(f"checkpoint.dir: {err}") from None
    for note in position.notes:
        warn(f"data: {note}")
