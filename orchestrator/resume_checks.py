"""What the driver checks about the checkpoint directory before anything starts: the newest
checkpoint's model (another one is refused in one line), its layout (another one is resharded
on load, said before the start), and whether the run is already complete. Reads only JSON: no
torch import before the preflight."""
from __future__ import annotations

import json
import os

from .config import RunConfig
from .errors import ConfigError


def latest_checkpoint_path(checkpoint_dir: str) -> str | None:
    from engine.checkpoint import latest_checkpoint

    return latest_checkpoint(checkpoint_dir)


def check_resumable(run: RunConfig, checkpoint_dir: str) -> str | None:
    """Before anything starts: refuses a newest checkpoint of another model (one line), and
    says when one of another world size or layout will be resharded on load."""
    if not os.path.isdir(checkpoint_dir):
        return None     # a first run: no checkpoint, and no torch import before the preflight
    from engine.checkpoint import describe_layout_diff, latest_checkpoint
    from engine.checkpoint.files import read_json
    from engine.checkpoint.manager import MANIFEST, rank_file_names
    from engine.config.model import shape_differences
    from engine.train.state import layout_of_config

    latest = latest_checkpoint(checkpoint_dir)
    if not run.schema.checkpoint.resume or latest is None:
        return None
    try:
        manifest = read_json(os.path.join(latest, MANIFEST))
        saved_model = read_json(os.path.join(latest, rank_file_names(0)[1]))["meta"].get("model") or {}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"checkpoint.dir={checkpoint_dir}: {latest} is not a readable checkpoint "
                          f"({type(err).__name__}: {err}); move it aside or set "
                          "checkpoint.resume=false") from None
    differences = shape_differences(saved_model, run.model)
    if differences:
        raise ConfigError(
            f"checkpoint.dir={checkpoint_dir}: its latest checkpoint (step {manifest.get('step')}) "
            f"holds another model ({differences}, saved vs this config); use the same model, "
            "another checkpoint.dir, or checkpoint.resume=false")
    current = layout_of_config(run.parallel(run.world_sizes[-1]))
    if run.elastic or manifest.get("layout") == current:
        return None
    return (f"resharding the checkpoint of step {manifest.get('step')} on load: "
            f"{describe_layout_diff(manifest.get('layout'), current)}")


def completed_step(run: RunConfig, checkpoint_dir: str) -> tuple[str, int] | None:
    """(newest checkpoint, its step) when resuming it would leave nothing to train."""
    if not os.path.isdir(checkpoint_dir):
        return None
    from engine.checkpoint import latest_checkpoint
    from engine.checkpoint.manager import MANIFEST

    latest = latest_checkpoint(checkpoint_dir)
    if not run.schema.checkpoint.resume or latest is None:
        return None
    with open(os.path.join(latest, MANIFEST), encoding="utf-8") as handle:
        step = int(json.load(handle).get("step", 0))
    return (latest, step) if step >= run.train.steps else None
