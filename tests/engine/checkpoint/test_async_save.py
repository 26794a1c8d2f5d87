"""Asynchronous checkpoint saves (engine/checkpoint/async_writer.py): the same bytes as a
synchronous save, a host copy that training may overwrite, one write in flight, keep-N,
and a process killed during a background write leaving the previous checkpoint the newest."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from engine.checkpoint import CheckpointError, CheckpointManager
import engine.checkpoint.manager as manager_module

from .test_manager import LAYOUT, _state

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _two_rank_saves(root, states, background: bool, keep: int = 0) -> list[str]:
    """Two managers of a world of 2 in threads (a threading.Barrier as the barrier): the
    background commit's cross-rank wait runs without any process group."""
    barrier = threading.Barrier(2, timeout=30)
    paths: list = [None, None]

    def rank_main(rank):
        manager = CheckpointManager(str(root), keep=keep, rank=rank, world_size=2,
                                    barrier=barrier.wait, commit_timeout_s=30)
        for step, state in states:
            paths[rank] = manager.save(step, state[rank], background=background)
        manager.flush()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return paths


def _state_pair(step):
    pair = [_state(step, seed=0), _state(step, seed=1)]
    for rank, state in enumerate(pair):
        state["meta"] = dict(state["meta"], layout=dict(LAYOUT, world_size=2), rank=rank)
    return pair


def test_async_save_writes_the_same_bytes_as_the_synchronous_save(tmp_path):
    (sync_dir,) = set(_two_rank_saves(tmp_path / "sync", [(5, _state_pair(5))], background=False))
    (async_dir,) = set(_two_rank_saves(tmp_path / "async", [(5, _state_pair(5))], background=True))
    names = sorted(os.listdir(sync_dir))
    assert names == sorted(os.listdir(async_dir)) and len(names) == 7   # 3 per rank + manifest
    for name in names:
        if name == "manifest.json":
            continue
        with open(os.path.join(sync_dir, name), "rb") as a, open(os.path.join(async_dir, name), "rb") as b:
            assert a.read() == b.read(), name

    def manifest(path):
        data = json.loads(open(os.path.join(path, "manifest.json")).read())
        data.pop("created_unix")
        return data
    assert manifest(sync_dir) == manifest(async_dir)     # SHA-256 of every file included


def test_background_save_keeps_a_host_copy_and_keep_n_holds(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep=2, rank=0, world_size=1, barrier=lambda: None)
    for step in range(1, 5):
        state = _state(step, seed=step)
        expected = state["tensors"]["embed.weight"].clone()
        manager.save(step, state, background=True)
        state["tensors"]["embed.weight"].add_(100.0)     # training goes on, in place
    manager.flush()
    assert [s for s, _ in manager.checkpoints()] == [3, 4]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]   # no temp leftovers
    loaded = manager.load(manager.latest(), layout=LAYOUT)
    assert torch.equal(loaded["tensors"]["embed.weight"], expected)
    reports = manager.finished_writes()
    assert [r["step"] for r in reports] == [1, 2, 3, 4] and all(r["write_s"] > 0 for r in reports)


def test_the_next_save_waits_for_the_previous_write(tmp_path, monkeypatch):
    release, started = threading.Event(), threading.Event()
    real_save_file = manager_module.save_file

    def slow_save_file(tensors, path):
        started.set()
        assert release.wait(30)
        real_save_file(tensors, path)

    monkeypatch.setattr(manager_module, "save_file", slow_save_file)
    manager = CheckpointManager(str(tmp_path), keep=0, rank=0, world_size=1, barrier=lambda: None)
    t0 = time.perf_counter()
    manager.save(1, _state(1), background=True)
    assert time.perf_counter() - t0 < 5 and started.wait(10)    # returned while the write blocks
    assert manager.latest() is None                           # nothing published yet
    second = threading.Thread(target=manager.save, args=(2, _state(2)), kwargs={"background": True})
    second.start()
    second.join(0.5)
    assert second.is_alive()                                  # held up by write 1
    assert not os.path.exists(tmp_path / ".tmp-step00000002")
    release.set()
    second.join(30)
    manager.flush()
    assert [s for s, _ in manager.checkpoints()] == [1, 2]


def test_an_error_in_the_background_write_is_raised_by_the_next_wait(tmp_path, monkeypatch):
    def failing_save_file(tensors, path):
        raise OSError("disk full")

    monkeypatch.setattr(manager_module, "save_file", failing_save_file)
    manager = CheckpointManager(str(tmp_path), keep=0, rank=0, world_size=1, barrier=lambda: None)
    manager.save(1, _state(1), background=True)
    with pytest.raises(OSError, match="disk full"):
        manager.flush()
    assert manager.latest() is None


def test_a_failed_background_write_is_raised_at_the_first_step_after_it(tmp_path, monkeypatch):
    # Not at the next save, an interval later: until then the run would have no new
    # checkpoint, and the next save (perhaps the preemption one) would be lost as well.
    manager = CheckpointManager(str(tmp_path), keep=0, rank=0, world_size=1, barrier=lambda: None)
    manager.save(10, _state(10))
    real_save_file = manager_module.save_file

    def failing_save_file(tensors, path):
        with open(path, "wb") as handle:   # a partial file, then the disk is full
            handle.write(b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(manager_module, "save_file", failing_save_file)
    manager.save(20, _state(20), background=True)
    deadline = time.monotonic() + 30
    while manager._inflight is not None and not manager._inflight.done() and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(CheckpointError, match=r"step 20 failed on rank 0: OSError: .*No space left.*"
                                              r"newest complete one is .*step00000010"):
        manager.finished_writes()
    assert [step for step, _ in manager.checkpoints()] == [10]
    monkeypatch.setattr(manager_module, "save_file", real_save_file)
    manager.save(30, _state(30))          # the failure is not raised a second time
    assert manager.finished_writes()[0]["step"] == 30


def test_commit_names_the_rank_whose_files_never_came(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep=0, rank=0, world_size=2, barrier=lambda: None,
                                commit_timeout_s=0.3)
    manager.save(1, _state(1), background=True)
    with pytest.raises(CheckpointError, match="rank00001.sha256.json"):
        manager.wait()
    assert manager.latest() is None


# The child saves step 1, then step 2 in the background; the patched function signals
# the parent at the chosen point of the write and sleeps until SIGKILLed.
_CHILD = textwrap.dedent("""
    import os, sys, time
    import engine.checkpoint.manager as m
    from tests.engine.checkpoint.test_manager import _state
    root, point, ready = sys.argv[1:4]
    real = getattr(m, point)
    def stall(*args):
        real(*args)
        open(ready, "w").close()
        time.sleep(120)
    manager = m.CheckpointManager(root, keep=2, rank=0, world_size=1, barrier=lambda: None)
    manager.save(1, _state(1), background=True)
    manager.flush()
    setattr(m, point, stall)
    manager.save(2, _state(2, seed=5), background=True)
    manager.flush()
""")


@pytest.mark.parametrize("point", ["save_file", "write_json_durable", "fsync_dir"])
def test_a_kill_during_the_background_write_leaves_the_previous_checkpoint(tmp_path, point):
    """Killed after this rank's tensors are written (save_file), after its first JSON file
    (write_json_durable), or with the manifest written but not yet renamed (fsync_dir, the
    manifest's last act)."""
    root, ready = tmp_path / "ckpt", tmp_path / "ready"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(root), point, str(ready)],
                             cwd=ROOT, env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    assert os.path.isdir(root / ".tmp-step00000002")         # the write was under way
    manager = CheckpointManager(str(root), keep=2, rank=0, world_size=1, barrier=lambda: None)
    assert manager.latest() == str(root / "step00000001")
    loaded = manager.load(manager.latest(), layout=LAYOUT)   # SHA-256 verified
    assert torch.equal(loaded["tensors"]["embed.weight"], _state(1)["tensors"]["embed.weight"])
    manager.save(2, _state(2), background=True)               # the next save cleans up
    manager.flush()
    assert sorted(os.listdir(root)) == ["step00000001", "step00000002"]
