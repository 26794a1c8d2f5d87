"""A rank's heartbeat: busy time leaves out sleeping (a blocked collective), beats come
from their own thread while the training thread only sets fields, and the last beat says
the rank left on purpose."""
from __future__ import annotations

import os
import time

from workers.heartbeat import Heartbeat, busy_seconds, heartbeat_path, read_heartbeat


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_busy_time_counts_work_and_waiting_for_a_core_but_not_sleep():
    before = busy_seconds()
    time.sleep(0.2)
    slept = busy_seconds() - before
    before, wall = busy_seconds(), time.perf_counter()
    _spin(0.2)
    spun, wall = busy_seconds() - before, time.perf_counter() - wall
    assert slept < 0.05, slept
    # runnable the whole time: on a core or in the run queue (schedstat), so ~ the wall time
    assert 0.9 * wall <= spun <= wall + 0.01, (spun, wall)


def test_beats_publish_the_phase_and_step_times_and_the_last_says_exited(tmp_path):
    hb = Heartbeat(str(tmp_path), rank=3, world_size=4, interval_s=0.05).start()
    path = heartbeat_path(str(tmp_path), 3)
    first = read_heartbeat(path)
    assert first["rank"] == 3 and first["pid"] == os.getpid() and first["phase"] == "setup"
    hb.begin_step(5)
    hb.phase("backward", ("tp", "ep"))
    _spin(0.05)
    time.sleep(0.1)               # the training thread blocked: beats go on
    hb.end_step(5)
    hb.phase("checkpoint", ("world",))
    time.sleep(0.2)
    seen = read_heartbeat(path)
    assert seen["beat"] > first["beat"] + 2
    assert (seen["step"], seen["phase"], seen["axes"]) == (5, "checkpoint", ["world"])
    ((step, wall_s, busy_s),) = seen["step_times"]
    assert step == 5 and wall_s >= 0.15 and busy_s < wall_s - 0.05, seen["step_times"]
    assert seen["progress"] == 4   # begin_step, backward, end_step, checkpoint
    hb.close("exited")
    last = read_heartbeat(path)
    assert last["phase"] == "exited" and not hb._thread.is_alive()
    time.sleep(0.15)
    assert read_heartbeat(path)["beat"] == last["beat"]     # no beats after close
