"""The walk-back from the newest checkpoint (engine/checkpoint/fallback.py): corrupt ones are
moved to quarantine/ with their reason, the next older one is used, a misfit stops the walk
without moving anything, and ranks (threads here, sharing a gather) agree on one step."""
from __future__ import annotations

import json
import os
import threading

import pytest
import torch

from engine.checkpoint import CheckpointError, CheckpointManager
from engine.checkpoint.fallback import (NoVerifiedCheckpointError, load_newest_verified, quarantined,
                                        verify_everything, verify_structure)
from engine.checkpoint.manager import CorruptCheckpointError, rank_file_names, verify_file

LAYOUT = {"world_size": 1, "tp": 1}


def _save(root, steps, world: int = 1):
    """Checkpoints of `steps`, written by `world` ranks (threads sharing a barrier)."""
    barrier = threading.Barrier(world)
    layout = dict(LAYOUT, world_size=world)

    def rank_main(rank):
        manager = CheckpointManager(str(root), keep=0, rank=rank, world_size=world, barrier=barrier.wait)
        for step in steps:
            manager.save(step, {"tensors": {"w": torch.full((64,), float(step + rank))},
                                "shards": {}, "meta": {"step": step, "layout": layout}})
    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _flip_byte(path, offset=-3):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _load_all(path):
    return verify_everything(path)[0]["step"]


def test_a_flipped_byte_falls_back_to_the_previous_checkpoint_and_keeps_the_bad_one(tmp_path):
    _save(tmp_path, [1, 2, 3])
    _flip_byte(tmp_path / "step00000003" / "rank00000.safetensors")
    warnings = []
    path, step = load_newest_verified(str(tmp_path), _load_all, warn=warnings.append)
    assert (os.path.basename(path), step) == ("step00000002", 2)
    assert quarantined(str(tmp_path)) == ["step00000003.sha256-mismatch"]
    kept = tmp_path / "quarantine" / "step00000003.sha256-mismatch"
    assert (kept / "rank00000.safetensors").is_file()          # moved, never deleted
    note = json.loads((kept / "quarantine.json").read_text())
    assert note["reason"] == "sha256-mismatch" and note["original"] == str(tmp_path / "step00000003")
    (warning,) = warnings
    assert "rank00000.safetensors: SHA-256 mismatch" in warning and str(kept) in warning
    assert "falling back to the next older checkpoint" in warning
    # The manager no longer lists it; the next save of step 3 is a new, complete checkpoint.
    assert [s for s, _ in CheckpointManager(str(tmp_path), 0, 0, 1, lambda: None).checkpoints()] == [1, 2]


def test_truncated_shard_and_invalid_manifest_are_caught_by_the_structure_check(tmp_path):
    _save(tmp_path, [1, 2, 3])
    shard = tmp_path / "step00000003" / "rank00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    (tmp_path / "step00000002" / "manifest.json").write_text("{not json")
    warnings = []
    path, _ = load_newest_verified(str(tmp_path), verify_structure, warn=warnings.append)
    assert os.path.basename(path) == "step00000001"
    assert quarantined(str(tmp_path)) == ["step00000002.bad-manifest", "step00000003.truncated"]
    assert "bytes, the manifest says" in warnings[0] and "not valid JSON" in warnings[1]


def test_an_edited_world_size_is_a_malformed_manifest(tmp_path):
    _save(tmp_path, [1], world=2)
    manifest_path = tmp_path / "step00000001" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps(dict(manifest, world_size=4)))
    with pytest.raises(CorruptCheckpointError, match="world_size 4 disagrees with its file list"):
        verify_structure(str(tmp_path / "step00000001"))
    manifest_path.write_text(json.dumps(dict(manifest, layout=dict(manifest["layout"], tp=2))))
    with pytest.raises(CorruptCheckpointError, match="layout .* disagrees with rank 0's record"):
        verify_structure(str(tmp_path / "step00000001"))


def test_when_none_verifies_one_line_and_no_silent_fresh_start(tmp_path):
    _save(tmp_path, [1])
    (tmp_path / "step00000001" / "manifest.json").write_text("[1, 2")
    with pytest.raises(NoVerifiedCheckpointError) as info:
        load_newest_verified(str(tmp_path), verify_structure, warn=lambda m: None)
    message = str(info.value)
    assert "\n" not in message and "no checkpoint verifies" in message
    assert "step00000001/manifest.json: not valid JSON" in message and "--no-resume" in message
    # The next attempt (a restarted group, a new driver) refuses too instead of step 0.
    with pytest.raises(NoVerifiedCheckpointError, match="no complete checkpoint, and 1 in .*quarantine"):
        load_newest_verified(str(tmp_path), verify_structure)
    assert load_newest_verified(str(tmp_path / "elsewhere"), verify_structure) is None


def test_a_checkpoint_that_does_not_fit_stops_the_walk_and_moves_nothing(tmp_path):
    _save(tmp_path, [1, 2])

    def another_model(path):
        raise CheckpointError(f"{path} holds another model")
    with pytest.raises(CheckpointError, match="step00000002 holds another model"):
        load_newest_verified(str(tmp_path), another_model)
    assert quarantined(str(tmp_path)) == []


class ThreadGather:
    """all_gather_object for threads: every rank's value, in rank order."""

    def __init__(self, world):
        self.world, self.values, self.barrier = world, [None] * world, threading.Barrier(world)

    def __call__(self, rank, value):
        self.values[rank] = value
        self.barrier.wait()
        out = list(self.values)
        self.barrier.wait()
        return out


def test_ranks_agree_when_only_one_rank_sees_the_corruption(tmp_path):
    """Each rank verifies only its own files (an unchanged layout): rank 1's corrupt file
    makes both ranks load the older step, and exactly one rename happens."""
    _save(tmp_path, [1, 2], world=2)
    _flip_byte(tmp_path / "step00000002" / "rank00001.safetensors")
    gather, results, warnings = ThreadGather(2), {}, []

    def rank_main(rank):
        def own_files(path):
            manifest, _ = verify_structure(path)
            verify_file(path, rank_file_names(rank)[0], manifest)
            return manifest["step"]
        results[rank] = load_newest_verified(str(tmp_path), own_files, rank=rank,
                                             gather=lambda v: gather(rank, v), warn=warnings.append)
    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [results[r][1] for r in range(2)] == [1, 1]
    assert quarantined(str(tmp_path)) == ["step00000002.sha256-mismatch"]
    (warning,) = warnings                          # rank 0 alone warns (and renames)
    assert "found by rank 1" in warning and "rank00001.safetensors" in warning


def test_no_resume_job_resumes_only_from_the_checkpoints_it_wrote(tmp_path):
    """--no-resume ignores older checkpoints, but a restarted group of the same job goes on
    from its own (created at or after the driver's start)."""
    import time
    _save(tmp_path, [5, 6])                       # an earlier run's
    since = time.time()
    assert load_newest_verified(str(tmp_path), _load_all, since_unix=since) is None
    _save(tmp_path, [2])                          # this job's first checkpoint
    path, step = load_newest_verified(str(tmp_path), _load_all, since_unix=since)
    assert (os.path.basename(path), step) == ("step00000002", 2)
    path, step = load_newest_verified(str(tmp_path), _load_all)   # plain resume: the newest
    assert step == 6
