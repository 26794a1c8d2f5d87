"""The stopping driver's side of a preemption save (orchestrator/stop_save.py): it writes the
request the workers' rank 0 votes with, and waits for a newer complete checkpoint, at most
the grace. The workers here are a thread that saves when the request appears."""
from __future__ import annotations

import os
import threading
import time

from engine.checkpoint import CheckpointManager
from orchestrator.stop_save import is_stop_save, save_before_stop
from workers.preemption import STOP_SAVE_KEY, PreemptionWatch

from ..engine.checkpoint.test_manager import _state


def _worker_group(job_dir, ckpt_dir, stop: threading.Event):
    """Rank 0 of a one-rank group: a step every 50 ms, a save when the watch asks."""
    manager = CheckpointManager(str(ckpt_dir), keep=0, rank=0, world_size=1, barrier=lambda: None)
    manager.save(1, _state(1))
    watch = PreemptionWatch(str(job_dir), rank=0, grace_s=25)
    step = 1
    while not stop.is_set():
        time.sleep(0.05)
        step += 1
        if watch.requested():
            # A periodic save in flight at the signal lands first; the driver must not take it.
            manager.save(step, _state(step))
            time.sleep(0.3)
            state = _state(step + 1)
            state["meta"][STOP_SAVE_KEY] = True
            manager.save(step + 1, state)
            return


def test_the_driver_asks_and_waits_for_the_new_checkpoint(tmp_path):
    stop = threading.Event()
    group = threading.Thread(target=_worker_group, args=(tmp_path, tmp_path / "ckpt", stop))
    group.start()
    while not (tmp_path / "ckpt" / "step00000001").exists():
        time.sleep(0.01)
    try:
        saved = save_before_stop(str(tmp_path), str(tmp_path / "ckpt"), grace_s=10,
                                 finished=lambda: False)
    finally:
        stop.set()
        group.join(10)
    assert saved is not None and os.path.basename(saved) > "step00000001"
    assert is_stop_save(saved) and len(os.listdir(tmp_path / "ckpt")) == 3   # not the periodic one
    assert (tmp_path / "preempt.request").is_file()


def test_the_driver_waits_no_longer_than_the_grace(tmp_path):
    (tmp_path / "ckpt").mkdir()
    start = time.monotonic()
    assert save_before_stop(str(tmp_path), str(tmp_path / "ckpt"), grace_s=0.5,
                            finished=lambda: False) is None
    assert 0.5 <= time.monotonic() - start < 5
    start = time.monotonic()                       # training ended: no wait at all
    assert save_before_stop(str(tmp_path), str(tmp_path / "ckpt"), grace_s=30,
                            finished=lambda: True) is None
    assert time.monotonic() - start < 1
