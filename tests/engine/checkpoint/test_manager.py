"""CheckpointManager on one rank: round trip, manifest hashes, keep-N, partial and corrupt
checkpoints, world-size and layout refusal."""
import hashlib
import json
import os
import time

import pytest
import torch

from engine.checkpoint import CheckpointError, CheckpointManager

LAYOUT = {"world_size": 1, "tp": 1, "cp": 1, "pp": 1, "ep": 1, "etp": 1}


def _manager(root, keep=2, world_size=1):
    return CheckpointManager(str(root), keep=keep, rank=0, world_size=world_size,
                             barrier=lambda: None)


def _state(step, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(4, 6, generator=gen)
    return {
        "tensors": {"embed.weight": weight, "head.weight": weight,  # tied: shared storage
                    "layers.0.wq.weight": weight.t(),               # non-contiguous view
                    "half": torch.randn(3, generator=gen).to(torch.bfloat16),
                    "optim.step": torch.tensor(step, dtype=torch.int64),
                    "rng/torch_cpu": torch.get_rng_state()},
        "shards": {"embed.weight": {"global_shape": [4, 6], "dim": None, "offset": 0,
                                    "axes": []}},
        "meta": {"step": step, "layout": LAYOUT}}


def test_round_trip_preserves_values_dtypes_and_json(tmp_path):
    manager = _manager(tmp_path)
    state = _state(3)
    path = manager.save(3, state)
    assert os.path.basename(path) == "step00000003" and manager.latest() == path
    loaded = manager.load(path, 0, layout=LAYOUT)
    assert set(loaded["tensors"]) == set(state["tensors"])
    for name, tensor in state["tensors"].items():
        assert loaded["tensors"][name].dtype == tensor.dtype
        assert torch.equal(loaded["tensors"][name], tensor), name
    assert loaded["shards"] == state["shards"] and loaded["meta"] == state["meta"]


def test_manifest_lists_sha256_of_every_rank_file(tmp_path):
    path = _manager(tmp_path).save(1, _state(1))
    manifest = json.loads(open(os.path.join(path, "manifest.json")).read())
    assert manifest["world_size"] == 1 and manifest["step"] == 1 and manifest["layout"] == LAYOUT
    assert set(manifest["files"]) == {"rank00000.safetensors", "rank00000.json"}
    for name, record in manifest["files"].items():
        data = open(os.path.join(path, name), "rb").read()
        assert record == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def test_keeps_newest_n(tmp_path):
    manager = _manager(tmp_path, keep=2)
    for step in (10, 20, 30):
        manager.save(step, _state(step))
    assert [step for step, _ in manager.checkpoints()] == [20, 30]
    assert sorted(os.listdir(tmp_path)) == ["step00000020", "step00000030"]
    keep_all = _manager(tmp_path / "all", keep=0)
    for step in (1, 2, 3):
        keep_all.save(step, _state(step))
    assert len(keep_all.checkpoints()) == 3


def test_a_no_resume_job_rotates_only_its_own_checkpoints(tmp_path):
    # --no-resume keeps an earlier run's checkpoints: keep=2 must not count (and delete)
    # the new job's step 10 against the old run's newer-numbered 500 and 1000.
    old = _manager(tmp_path, keep=2)
    for step in (500, 1000):
        old.save(step, _state(step))
    start = time.time()
    new = CheckpointManager(str(tmp_path), keep=2, rank=0, world_size=1, barrier=lambda: None,
                            own_since_unix=start)
    for step in (10, 20, 30, 600):
        new.save(step, _state(step))
    assert [step for step, _ in new.checkpoints()] == [30, 500, 600, 1000]
    # A step the old run also saved: the old one is moved aside, not deleted.
    new.save(1000, _state(1000, seed=1))
    assert [step for step, _ in new.checkpoints()] == [500, 600, 1000]
    aside, = os.listdir(tmp_path / "superseded")
    assert aside.startswith("step00001000-")
    assert not torch.equal(new.load(new.latest())["tensors"]["half"],
                           new.load(str(tmp_path / "superseded" / aside))["tensors"]["half"])
    # Without own_since_unix the same directory rotates by step number, as before.
    plain = _manager(tmp_path, keep=2)
    plain.save(40, _state(40))
    assert [step for step, _ in plain.checkpoints()] == [600, 1000]


def test_partial_checkpoints_are_ignored_then_cleaned(tmp_path):
    manager = _manager(tmp_path, keep=3)
    good = manager.save(5, _state(5))
    killed_tmp = tmp_path / ".tmp-step00000009"      # killed before the manifest
    killed_tmp.mkdir()
    (killed_tmp / "rank00000.safetensors").write_bytes(b"partial")
    no_manifest = tmp_path / "step00000008"           # e.g. a half-finished copy
    no_manifest.mkdir()
    assert manager.latest() == good
    with pytest.raises(CheckpointError, match="no manifest.json"):
        manager.load(str(no_manifest), 0)
    manager.save(6, _state(6))
    assert sorted(os.listdir(tmp_path)) == ["step00000005", "step00000006"]


def test_resaving_a_step_replaces_it(tmp_path):
    manager = _manager(tmp_path)
    manager.save(4, _state(4, seed=1))
    path = manager.save(4, _state(4, seed=2))
    expected = _state(4, seed=2)["tensors"]["embed.weight"]
    assert torch.equal(manager.load(path, 0)["tensors"]["embed.weight"], expected)


@pytest.mark.parametrize("name", ["rank00000.safetensors", "rank00000.json"])
def test_corrupt_file_is_named(tmp_path, name):
    manager = _manager(tmp_path)
    path = manager.save(2, _state(2))
    target = os.path.join(path, name)
    data = bytearray(open(target, "rb").read())
    data[-2] ^= 0x01
    open(target, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match=f"{name}: SHA-256 mismatch"):
        manager.load(path, 0)


def test_refuses_other_world_size_and_layout(tmp_path):
    path = _manager(tmp_path).save(7, _state(7))
    with pytest.raises(CheckpointError, match="written by world size 1, this run has 2"):
        _manager(tmp_path, world_size=2).load(path, 0)
    other = dict(LAYOUT, tp=2)
    with pytest.raises(CheckpointError, match="tp: saved=1, this run=2"):
        _manager(tmp_path).load(path, 0, layout=other)


def test_meta_must_be_json(tmp_path):
    state = _state(1)
    state["meta"]["bad"] = torch.ones(1)
    with pytest.raises(TypeError, match="rank00000.json: not JSON-serialisable"):
        _manager(tmp_path).save(1, state)
    assert _manager(tmp_path).latest() is None


def test_constructor_validation(tmp_path):
    with pytest.raises(ValueError, match="keep=-1"):
        CheckpointManager(str(tmp_path), keep=-1, rank=0, world_size=1, barrier=lambda: None)
    with pytest.raises(ValueError, match="rank=2"):
        CheckpointManager(str(tmp_path), keep=1, rank=2, world_size=2, barrier=lambda: None)
