"""Walking back from the newest checkpoint to the newest one that verifies.

A checkpoint that fails verification (a SHA-256 mismatch, a truncated or missing file, a
malformed manifest, a manifest that disagrees with its rank files) is moved aside, never
deleted, into `<root>/quarantine/step00000012.<reason>` (a `quarantine.json` inside says
why, when and by whom), and the next older complete one is tried. Only a checkpoint that
does not fit the run (another model) or an unexpected error stops the walk: moving good
checkpoints aside because of a config mistake would lose them for the right config.

Collective agreement: every rank tries the same candidate (rank 0's listing, shared once),
each verifying what it reads; the outcomes are gathered, so all ranks take the same
decision: load this step, move it aside (rank 0 alone renames), or raise the same error.
One gather per candidate and nothing else: no rank waits in a collective another rank
skipped, whatever it raised. A root that holds quarantined checkpoints and no complete one
is an error too, so a restarted worker group never silently starts again at step 0.
"""
from __future__ import annotations

import os
import re
import socket
import sys
import time
from typing import Any, Callable

from .files import read_json, rename_durable, write_json_durable
from .manager import (CheckpointError, CorruptCheckpointError, complete_checkpoints, created_since,
                      rank_file_names, read_manifest, verify_file)

QUARANTINE = "quarantine"
_RANK_FILE = re.compile(r"rank\d{5,}\.(safetensors|json)")
QUARANTINE_NOTE = "quarantine.json"


class NoVerifiedCheckpointError(CheckpointError):
    """Every checkpoint under the root failed verification (they are all in quarantine/)."""


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def verify_structure(path: str) -> tuple[dict, dict]:
    """(manifest, rank 0's meta) after every check that reads no tensor file: the manifest
    parses and is complete, its rank files are exactly those of its world size, every
    file exists with the recorded size, the rank JSON files match their SHA-256, and the
    manifest's layout and step agree with rank 0's own record (an edited manifest)."""
    manifest = read_manifest(path)
    where = os.path.join(path, "manifest.json")
    world = manifest["world_size"]
    expected = {name for rank in range(world) for name in rank_file_names(rank)}
    listed = {name for name in manifest["files"] if _RANK_FILE.fullmatch(name)}
    if listed != expected:
        ranks = len({name.split(".")[0] for name in listed})
        raise CorruptCheckpointError(f"{where}: world_size {world} disagrees with its file list "
                                     f"({ranks} ranks' files); the manifest was edited or is "
                                     "corrupt", "bad-manifest")
    for rank in range(world):
        tensor_name, json_name = rank_file_names(rank)
        verify_file(path, json_name, manifest)
        _check_size(path, tensor_name, manifest)
    for name in set(manifest["files"]) - listed:     # files other savers may add
        _check_size(path, name, manifest)
    meta = read_json(os.path.join(path, rank_file_names(0)[1])).get("meta", {})
    for key in ("layout", "step"):
        if key in meta and meta[key] != manifest[key]:
            raise CorruptCheckpointError(f"{where}: {key} {manifest[key]!r} disagrees with "
                                         f"rank 0's record {meta[key]!r}; the manifest was "
                                         "edited or is corrupt", "bad-manifest")
    return manifest, meta


def _check_size(path: str, name: str, manifest: dict) -> None:
    file_path = os.path.join(path, name)
    recorded = manifest["files"][name]
    if not os.path.isfile(file_path):
        raise CorruptCheckpointError(f"{file_path}: missing from the checkpoint", "missing-file")
    size = os.path.getsize(file_path)
    if isinstance(recorded, dict) and size != recorded.get("bytes"):
        raise CorruptCheckpointError(f"{file_path}: {size} bytes, the manifest says "
                                     f"{recorded.get('bytes')}; the file is truncated or was "
                                     "modified", "truncated" if size < (recorded.get("bytes") or 0)
                                     else "size-mismatch")


def verify_everything(path: str) -> tuple[dict, dict]:
    """verify_structure plus the SHA-256 of every tensor file (reads the whole checkpoint)."""
    manifest, meta = verify_structure(path)
    for rank in range(manifest["world_size"]):
        verify_file(path, rank_file_names(rank)[0], manifest)
    return manifest, meta


def quarantined(root: str) -> list[str]:
    folder = os.path.join(root, QUARANTINE)
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def quarantine(root: str, path: str, reason: str, message: str) -> str:
    """Moves the checkpoint at `path` to <root>/quarantine/<name>.<reason>[.N]; returns it."""
    folder = os.path.join(root, QUARANTINE)
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, f"{os.path.basename(path)}.{reason}")
    count = 1
    while os.path.exists(target):
        count += 1
        target = os.path.join(folder, f"{os.path.basename(path)}.{reason}.{count}")
    rename_durable(path, target)
    write_json_durable(os.path.join(target, QUARANTINE_NOTE), {
        "original": path, "reason": reason, "message": message, "time_unix": time.time(),
        "host": socket.gethostname(), "pid": os.getpid()})
    return target


def _alone(value: Any) -> list[Any]:
    return [value]


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_newest_verified(root: str, try_load: Callable[[str], Any], *, rank: int = 0,
                         gather: Callable[[Any], list[Any]] = _alone,
                         warn: Callable[[str], None] = _to_stderr,
                         since_unix: float | None = None) -> tuple[str, Any] | None:
    """(path, what try_load returned on this rank) for the newest checkpoint under `root`
    that every rank loaded, or None when there is none (a fresh start).

    try_load(path) verifies what this rank reads and loads it, raising CorruptCheckpointError
    for a checkpoint that fails verification; gather(value) returns every rank's value in
    rank order (one process: [value]); warn is called on rank 0 for each checkpoint moved
    aside. Raises CheckpointError (the same message on every rank) for a checkpoint that does
    not fit, and NoVerifiedCheckpointError when none verifies. With since_unix, only the
    checkpoints written at or after it are candidates (a --no-resume job's own ones)."""
    listing = [path for _, path in complete_checkpoints(root)
               if since_unix is None or created_since(path, since_unix)]
    candidates = gather(listing)[0]
    if not candidates:
        if since_unix is not None:
            return None
        held = quarantined(root)
        if held:
            raise NoVerifiedCheckpointError(
                f"no complete checkpoint, and {len(held)} in {os.path.join(root, QUARANTINE)} "
                f"({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}) failed verification; "
                "move a repaired one back, or start over with --no-resume (checkpoint.resume=false)")
        return None
    problems = []
    for path in reversed(candidates):
        value, outcome, own_error = None, ("ok", "", ""), None
        try:
            value = try_load(path)
        except CorruptCheckpointError as err:
            outcome = ("corrupt", err.reason, _one_line(err))
        except Exception as err:  # noqa: BLE001 - shared, so that every rank raises, none hangs
            outcome, own_error = ("refused", "", _one_line(err)), err
        outcomes = gather(outcome)
        refused = [(r, o) for r, o in enumerate(outcomes) if o[0] == "refused"]
        if refused:
            if own_error is not None and not isinstance(own_error, CheckpointError):
                raise own_error
            first_rank, (_, _, message) = refused[0]
            raise CheckpointError(message if len(outcomes) == 1 else f"rank {first_rank}: {message}")
        corrupt = [(r, o) for r, o in enumerate(outcomes) if o[0] == "corrupt"]
        if not corrupt:
            return path, value
        first_rank, (_, reason, message) = corrupt[0]
        problems.append(f"{os.path.basename(path)}: {message}")
        if rank == 0:
            moved = quarantine(root, path, reason, message)
            older = "falling back to the next older checkpoint" if path != candidates[0] \
                else "no older checkpoint left"
            warn(f"warning: checkpoint {path} failed verification ({reason}"
                 f"{'' if len(outcomes) == 1 else f', found by rank {first_rank}'}: {message}); "
                 f"moved to {moved}; {older}")
    raise NoVerifiedCheckpointError(
        f"no checkpoint verifies ({'; '.join(problems)}); they are kept in "
        f"{os.path.join(root, QUARANTINE)}; move a repaired one back, or start over with "
        "--no-resume (checkpoint.resume=false)")

