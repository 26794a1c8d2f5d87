"""Where the training data stands in a checkpoint, and what a resume with other settings does.

The data of a step is a pure function of (seed, consumed samples): sample g of the run is
window perm_epoch[g % n] of epoch g // n (engine/data/dataset.py). A checkpoint records the
samples consumed so far (Megatron's consumed_train_samples), not only the step, so a resume
with another global batch size continues where the run stopped instead of at step x the new
size (which skipped or repeated samples). It also records what fixes the order: seq_len,
seed, the token file's SHA-256, and the held-out windows. The held-out split is fixed when
training begins: a resume keeps holding out the same windows (the training permutation is
unchanged) and refuses an evaluation that would reach into windows already trained.
"""
from __future__ import annotations

from dataclasses import dataclass

KEYS = ("consumed_samples", "global_batch_size", "seq_len", "seed", "held_out", "tokens_sha256")


class DataContinuityError(ValueError):
    """A resume whose data settings cannot continue the saved run (one line)."""


@dataclass(frozen=True)
class Position:
    consumed_samples: int     # samples of the run already trained on
    held_out: int             # windows at the end of the token file never trained on
    notes: tuple[str, ...]    # what changed, for the user (one line each)


def data_state(consumed_samples: int, train, held_out: int, tokens_sha256: str | None) -> dict:
    """The checkpoint's `meta["data"]` after `consumed_samples` samples."""
    return {"consumed_samples": int(consumed_samples), "global_batch_size": train.global_batch_size,
            "seq_len": train.seq_len, "seed": train.seed, "held_out": int(held_out),
            "tokens_sha256": tokens_sha256}


def check_held_out(saved: dict, train) -> None:
    """Refuses an evaluation split larger than the windows held out when training began."""
    if not saved or not train.eval_every:
        return
    need, held = train.eval_batches * train.global_batch_size, int(saved.get("held_out", 0))
    if need > held:
        fits = held // train.global_batch_size
        raise DataContinuityError(
            f"train.eval_batches x train.global_batch_size = {need} held-out windows, but the run "
            f"being resumed held out {held}: val_loss would include windows already trained on; "
            + (f"use train.eval_batches <= {fits}" if fits else "turn train.eval_every off")
            + " (or --no-resume to start over with the new split)")


def resume_position(saved: dict, completed_steps: int, train, held_out_now: int,
                    tokens_sha256: str | None) -> Position:
    """The position to continue from. `saved` is the checkpoint's meta["data"] ({} for a
    fresh start, or a checkpoint from before it was recorded: step x batch size, as then)."""
    if not saved:
        return Position(completed_steps * train.global_batch_size, held_out_now, ())
    check_held_out(saved, train)
    consumed = int(saved["consumed_samples"])
    notes = []
    if saved.get("global_batch_size") != train.global_batch_size:
        notes.append(f"train.global_batch_size {saved.get('global_batch_size')} -> "
                     f"{train.global_batch_size}: the data continues at sample {consumed} of the same order")
    changed = [f"{key} {saved.get(key)} -> {now}" for key, now in
               (("seq_len", train.seq_len), ("seed", train.seed), ("tokens_sha256", tokens_sha256))
               if saved.get(key) is not None and saved.get(key) != now]
    if changed:
        notes.append(f"the data order changed ({', '.join(changed)}): training continues at sample "
                     f"{consumed} of the new order, so this epoch repeats some windows and skips others")
    return Position(consumed, int(saved.get("held_out", held_out_now)), tuple(notes))
