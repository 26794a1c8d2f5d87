"""Sharded checkpoints: one safetensors file per rank, a SHA-256 manifest, atomic publish.

Layout of `root` (a directory visible to every rank):
    step00000020/manifest.json            world size, layout, SHA-256 + size of every file
    step00000020/rank00000.safetensors    rank 0's tensors (never pickle)
    step00000020/rank00000.json           rank 0's "shards" and "meta"
    step00000020/rank00000.sha256.json    rank 0's own hashes, merged by rank 0 into the manifest
    .tmp-step00000030/                    a save in progress (or killed): ignored, cleaned later
    superseded/step00000010-<ns>/          an earlier run's step 10, replaced by a --no-resume job's
A checkpoint is complete iff its directory is named stepNNNNNNNN and holds manifest.json;
rank 0 writes the manifest only after every rank's files are on disk, then renames, so a
save killed at any point (also a background one, engine/checkpoint/async_writer.py)
leaves the previous complete checkpoint the newest one.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from .async_writer import BackgroundWrite, HostSnapshot, wait_for_files
from .files import (file_record, fsync_dir, fsync_file, read_json, rename_durable, sha256_file,
                    write_json_durable)

FORMAT = "foldmoe-sharded-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"step(\d{8,})")
_TMP_PREFIX = ".tmp-step"
_OLD_PREFIX = ".old-step"
SUPERSEDED = "superseded"   # an earlier run's checkpoints that a --no-resume job's replaced
_MANIFEST_KEYS = ("step", "world_size", "layout", "files")


class CheckpointError(ValueError):
    """A checkpoint that is corrupt, incomplete, or does not fit this run."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint that fails verification (hash, size, missing file, malformed manifest):
    loading walks back past it (engine/checkpoint/fallback.py). `reason` is a short tag."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def step_dir_name(step: int) -> str:
    return f"step{step:08d}"


def rank_file_names(rank: int) -> tuple[str, str]:
    return f"rank{rank:05d}.safetensors", f"rank{rank:05d}.json"


class CheckpointManager:
    """Saves and loads this rank's part of a sharded checkpoint under `root_dir`.

    keep: number of newest complete checkpoints kept (0 keeps all).
    barrier: blocks until every rank arrives (e.g. `torch.distributed.barrier`).
    commit_timeout_s: how long rank 0's background commit waits for the other ranks' files.
    own_since_unix: a --no-resume job's start: the rotation counts only the checkpoints
        written at or after it (manifest created_unix) and never deletes an older run's.
    """

    def __init__(self, root_dir: str, keep: int, rank: int, world_size: int,
                 barrier: Callable[[], None], commit_timeout_s: float = 600.0,
                 own_since_unix: float | None = None):
        if keep < 0:
            raise ValueError(f"keep={keep}: must be >= 0 (0 keeps every checkpoint)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is outside world_size={world_size}")
        self.root = os.path.abspath(root_dir)
        self.keep, self.rank, self.world_size, self.barrier = keep, rank, world_size, barrier
        self.commit_timeout_s, self.own_since_unix = commit_timeout_s, own_since_unix
        self._snapshot = HostSnapshot()
        self._inflight: BackgroundWrite | None = None
        self._unreported: list[BackgroundWrite] = []
        os.makedirs(self.root, exist_ok=True)

    # ---- save ----------------------------------------------------------------------------

    def save(self, step: int, state: dict, *, background: bool = False) -> str:
        """Writes this rank's state as checkpoint `step`; returns its directory.

        Foreground: wait for the previous write, then one barrier (so every rank's previous
        write is complete and rank 0 has published it). Synchronous (background=False): the
        write, the manifest and the publish happen before the return, on every rank.
        background=True: the state is first copied to host memory (async_writer.HostSnapshot),
        and the write and rank 0's manifest + publish + pruning run in a thread while training
        goes on; `wait()` / `flush()` / the next save wait for it."""
        self.wait()
        tmp = os.path.join(self.root, f"{_TMP_PREFIX}{step:08d}")
        final = os.path.join(self.root, step_dir_name(step))
        if background:
            state = self._snapshot.copy(state)
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a killed save of this step
            os.makedirs(tmp)
        self.barrier()
        write = BackgroundWrite(step, lambda: self._write_and_commit(
            step, state, tmp, final, sync=not background), thread=background)
        self._unreported.append(write)
        if background:
            self._inflight = write
        else:
            write.wait()
            self.barrier()
        return final

    def _write_and_commit(self, step: int, state: dict, tmp: str, final: str, *, sync: bool) -> None:
        """Rank files; then, on rank 0 once every rank's are on disk (a barrier when
        synchronous; their hash records appearing in a background write), the manifest
        (last), the atomic rename that makes the checkpoint visible, and the rotation."""
        self._write_rank_files(tmp, state)
        if sync:
            self.barrier()
        if self.rank != 0:
            return
        if not sync:
            self._await_records(tmp, step)
        self._write_manifest(tmp, step)
        self._publish(tmp, final)
        self._prune()

    def _await_records(self, tmp: str, step: int) -> None:
        paths = [os.path.join(tmp, f"rank{r:05d}.sha256.json") for r in range(self.world_size)]
        try:
            wait_for_files(paths, self.commit_timeout_s, f"checkpoint of step {step}")
        except TimeoutError as err:
            raise CheckpointError(f"{err}; a rank did not finish its part, step {step} "
                                  "stays unpublished") from None

    def wait(self) -> None:
        """Blocks until this rank's background write (if any) is done; re-raises its error."""
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            inflight.wait()

    def flush(self) -> None:
        """wait() on every rank, then a barrier: on return the last save is published."""
        self.wait()
        self.barrier()

    def finished_writes(self) -> list[dict]:
        """[{"step", "write_s"}] of the writes that finished since the last call (never
        blocks: a write still running is reported by a later call). A background write that
        failed raises CheckpointError here, at the first step after it ended, instead of
        leaving the run without checkpoints until the next save finds out."""
        done = [w for w in self._unreported if w.done()]
        self._unreported = [w for w in self._unreported if not w.done()]
        for write in done:
            if write.error is not None:
                if self._inflight is write:
                    self._inflight = None
                newest = self.latest()
                raise CheckpointError(
                    f"checkpoint of step {write.step} failed on rank {self.rank}: "
                    f"{type(write.error).__name__}: {write.error}; it stays unpublished, the "
                    f"newest complete one is {newest or 'none'}") from write.error
        return [{"step": w.step, "write_s": w.seconds} for w in done]

    def _write_rank_files(self, tmp: str, state: dict) -> None:
        tensor_name, json_name = rank_file_names(self.rank)
        tensor_path, json_path = os.path.join(tmp, tensor_name), os.path.join(tmp, json_name)
        save_file(_storable(state["tensors"]), tensor_path)
        fsync_file(tensor_path)
        write_json_durable(json_path, {"rank": self.rank, "shards": state.get("shards", {}),
                                       "meta": state.get("meta", {})})
        # Each rank hashes its own files (in parallel); rank 0 only merges the records.
        write_json_durable(os.path.join(tmp, f"rank{self.rank:05d}.sha256.json"), {
            "layout": state.get("meta", {}).get("layout"),
            "files": {tensor_name: file_record(tensor_path), json_name: file_record(json_path)}})

    def _write_manifest(self, tmp: str, step: int) -> None:
        files, layouts = {}, []
        for rank in range(self.world_size):
            record_path = os.path.join(tmp, f"rank{rank:05d}.sha256.json")
            if not os.path.isfile(record_path):
                raise CheckpointError(f"{record_path}: missing after the barrier; rank {rank} "
                                      f"did not write its part of step {step}")
            record = read_json(record_path)
            files.update(record["files"])
            layouts.append(record["layout"])
        if any(layout != layouts[0] for layout in layouts):
            raise CheckpointError(f"step {step}: ranks report different layouts {layouts}")
        write_json_durable(os.path.join(tmp, MANIFEST), {
            "format": FORMAT, "format_version": FORMAT_VERSION, "step": step,
            "world_size": self.world_size, "layout": layouts[0], "files": files,
            "created_unix": time.time()})
        fsync_dir(tmp)

    def _publish(self, tmp: str, final: str) -> None:
        """Atomic rename; a complete checkpoint of the same step is replaced, not merged. An
        earlier run's (before own_since_unix) is moved to superseded/ instead of deleted."""
        old = None
        if self.own_since_unix is not None and os.path.isfile(os.path.join(final, MANIFEST)) \
                and not created_since(final, self.own_since_unix):
            aside = os.path.join(self.root, SUPERSEDED, f"{os.path.basename(final)}-{time.time_ns()}")
            os.makedirs(os.path.dirname(aside), exist_ok=True)
            rename_durable(final, aside)
        if os.path.exists(final):
            old = os.path.join(self.root, f"{_OLD_PREFIX}{os.path.basename(final)[4:]}")
            shutil.rmtree(old, ignore_errors=True)
            rename_durable(final, old)
        rename_durable(tmp, final)
        if old:
            shutil.rmtree(old, ignore_errors=True)

    def _prune(self) -> None:
        """Deletes leftovers (temp, replaced, manifest-less) and all but the newest `keep`."""
        complete = {path for _, path in self.checkpoints()}
        doomed = [os.path.join(self.root, name) for name in os.listdir(self.root)
                  if name.startswith((_TMP_PREFIX, _OLD_PREFIX))
                  or (_STEP_DIR.fullmatch(name) and os.path.join(self.root, name) not in complete)]
        if self.keep:
            own = [path for _, path in self.checkpoints()
                   if self.own_since_unix is None or created_since(path, self.own_since_unix)]
            doomed += own[:-self.keep]
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)

    # ---- find and load ---------------------------------------------------------------------

    def checkpoints(self) -> list[tuple[int, str]]:
        """Complete checkpoints as (step, path), oldest first."""
        return complete_checkpoints(self.root)

    def latest(self) -> str | None:
        """The newest complete checkpoint, or None."""
        return latest_checkpoint(self.root)

    def load(self, path: str, rank: int | None = None, *, layout: dict | None = None) -> dict:
        """This rank's {"tensors", "shards", "meta"} after verifying hashes, world size, layout.

        layout: the current run's layout; when given, it must equal the saved one.
        """
        rank = self.rank if rank is None else rank
        manifest = self._read_manifest(path)
        self._check_fits(path, manifest, layout)
        tensor_name, json_name = rank_file_names(rank)
        for name in (tensor_name, json_name):
            verify_file(path, name, manifest)
        side = read_json(os.path.join(path, json_name))
        return {"tensors": load_file(os.path.join(path, tensor_name)),
                "shards": side["shards"], "meta": side["meta"]}

    def _read_manifest(self, path: str) -> dict:
        return read_manifest(path)

    def _check_fits(self, path: str, manifest: dict, layout: dict | None) -> None:
        if manifest["world_size"] != self.world_size:
            raise CheckpointError(
                f"{path} was written by world size {manifest['world_size']}, this run has "
                f"{self.world_size}; loading needs the same world size and layout (no resharding)")
        if layout is not None and manifest["layout"] != layout:
            raise CheckpointError(f"{path}: parallel layout differs from this run: "
                                  f"{describe_layout_diff(manifest['layout'], layout)}")


def read_manifest(path: str) -> dict:
    """The manifest of a complete checkpoint, after checking its format."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise CorruptCheckpointError(f"{path}: no {MANIFEST}; the checkpoint is incomplete "
                                     "(killed mid-save?) and cannot be loaded", "missing-manifest")
    try:
        manifest = read_json(manifest_path)
    except (ValueError, UnicodeDecodeError) as err:
        raise CorruptCheckpointError(f"{manifest_path}: not valid JSON ({err})", "bad-manifest") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or manifest.get("format_version") != FORMAT_VERSION:
        found = manifest if isinstance(manifest, dict) else {}
        raise CorruptCheckpointError(f"{manifest_path}: format {found.get('format')!r} version "
                                     f"{found.get('format_version')!r}; expected {FORMAT!r} "
                                     f"version {FORMAT_VERSION}", "bad-manifest")
    missing = [key for key in _MANIFEST_KEYS if key not in manifest]
    if missing or not isinstance(manifest["files"], dict) or not isinstance(manifest["world_size"], int):
        raise CorruptCheckpointError(f"{manifest_path}: malformed (missing or mistyped "
                                     f"{missing or ['files', 'world_size']})", "bad-manifest")
    return manifest


def describe_layout_diff(saved: dict | None, current: dict) -> str:
    """'key: saved=X, this run=Y' for each differing key."""
    saved = saved or {}
    keys = sorted(set(saved) | set(current), key=str)
    return "; ".join(f"{key}: saved={saved.get(key)!r}, this run={current.get(key)!r}"
                     for key in keys if saved.get(key) != current.get(key))


def verify_file(path: str, name: str, manifest: dict) -> None:
    file_path = os.path.join(path, name)
    expected = manifest["files"].get(name)
    if not isinstance(expected, dict) or not os.path.isfile(file_path):
        raise CorruptCheckpointError(f"{file_path}: missing from the checkpoint or its manifest",
                                     "missing-file")
    size = os.path.getsize(file_path)
    if isinstance(expected.get("bytes"), int) and size != expected["bytes"]:
        raise CorruptCheckpointError(f"{file_path}: {size} bytes, the manifest says "
                                     f"{expected['bytes']}; the file is truncated or was modified",
                                     "truncated" if size < expected["bytes"] else "size-mismatch")
    actual = sha256_file(file_path)
    if actual != expected.get("sha256"):
        raise CorruptCheckpointError(f"{file_path}: SHA-256 mismatch (manifest {expected.get('sha256')}, "
                                     f"file {actual}); the file is corrupt or was modified",
                                     "sha256-mismatch")


def _storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, no two entries sharing storage (safetensors refuses aliasing)."""
    out, seen = {}, set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.numel() and tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def complete_checkpoints(root_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints (those with a manifest) under root_dir as (step, path), oldest
    first; read-only, and empty when root_dir does not exist."""
    if not os.path.isdir(root_dir):
        return []
    found = []
    for name in os.listdir(root_dir):
        match = _STEP_DIR.fullmatch(name)
        path = os.path.join(root_dir, name)
        if match and os.path.isfile(os.path.join(path, MANIFEST)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def created_since(path: str, since_unix: float) -> bool:
    """Whether the checkpoint at `path` was written at or after `since_unix` (its manifest's
    created_unix); a manifest that cannot be read is not counted as this job's."""
    try:
        return float(read_manifest(path).get("created_unix", 0.0)) >= since_unix
    except (CheckpointError, OSError, TypeError, ValueError):
        return False


def latest_checkpoint(root_dir: str) -> str | None:
    found = complete_checkpoints(root_dir)
    return found[-1][1] if found else None
