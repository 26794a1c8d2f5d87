"""The driver's watchdog logic on a fake clock: which rank is hung and why, stragglers,
and the Watchdog reading real heartbeat files (no worker processes: the files are written
as the workers write them, the kill is recorded instead of sent)."""
from __future__ import annotations

import json
import os
import socket

from orchestrator.watchdog import HangDetector, StragglerDetector, Watchdog, where
from workers.heartbeat import heartbeat_path

TIMEOUT = 5.0


def beat(rank: int, n: int, progress: int, *, phase: str = "forward", step: int | None = 3,
         pid: int | None = None, axes=("ep",), world: int = 4, **extra) -> dict:
    return {"rank": rank, "beat": n, "progress": progress, "phase": phase, "step": step,
            "pid": pid if pid is not None else 1000 + rank, "axes": list(axes), "host": "host-a",
            "world_size": world, "started": 1.0, "group": "g1", "step_times": [], **extra}


def test_a_rank_whose_heartbeat_stops_is_named_after_the_timeout():
    detector = HangDetector(TIMEOUT)
    for t in range(0, 12):
        # rank 2 is frozen from t=3 on (SIGSTOP): its beat and progress counters stay put;
        # its peers keep beating while they wait for it in a collective
        beats = [beat(r, t if r != 2 else min(t, 3), t if r != 2 else min(t, 3)) for r in range(4)]
        beats[1]["progress"] = beats[3]["progress"] = min(t, 4)
        found = detector.observe(beats, now=float(t))
        if t <= 3 + TIMEOUT:
            assert found is None, t
        else:
            hung, why = found
            assert t == 9 and hung["rank"] == 2 and why == "no heartbeat for 6.0 s"
            break
    assert where(hung) == "forward (collectives on ep) at step 3"


def test_every_rank_alive_but_none_progressing_names_the_one_furthest_behind():
    detector = HangDetector(TIMEOUT)
    for t in range(0, 20):
        beats = [beat(r, t, min(t, 2), step=7 if r == 1 else 8, phase="backward") for r in range(4)]
        found = detector.observe(beats, now=float(t))
        if found:
            hung, why = found
            assert t == 8 and hung["rank"] == 1 and why.startswith("no progress for 6.0 s")
            return
    raise AssertionError("no hang found")


def test_long_phases_that_keep_beating_are_not_hangs():
    """Building the model, loading or saving a checkpoint may take longer than the timeout
    (the last save of a run is synchronous: 40 GB a rank to shared storage takes minutes)."""
    detector = HangDetector(TIMEOUT)
    for t in range(0, 30):
        beats = [beat(r, t, 1, phase="load_checkpoint" if r == 0 else "build", step=None)
                 for r in range(2)]
        assert detector.observe(beats, now=float(t)) is None
    saving = HangDetector(TIMEOUT)
    for t in range(0, 30):
        assert saving.observe([beat(r, t, 2, phase="checkpoint") for r in range(2)], now=float(t)) is None
    # A rank frozen during the save still stops beating, and is named.
    assert saving.observe([beat(0, 30, 2, phase="checkpoint"), beat(1, 29, 2, phase="checkpoint")],
                          now=float(30 + TIMEOUT + 1))[0]["rank"] == 1


def test_a_restarted_rank_starts_a_new_clock():
    detector = HangDetector(TIMEOUT)
    assert detector.observe([beat(0, 1, 1)], now=0.0) is None
    # same rank, new process (new group): a beat number that did not move is no hang
    assert detector.observe([beat(0, 1, 1, pid=77)], now=100.0) is None
    assert detector.observe([beat(0, 1, 1, pid=77)], now=104.0) is None
    assert detector.observe([beat(0, 1, 1, pid=77)], now=106.0)[0]["pid"] == 77


def test_a_rank_slower_than_the_others_for_n_steps_is_one_straggler_event():
    detector = StragglerDetector(factor=1.5, steps=3, world_size=4)
    found = []
    for step in range(8):
        for rank in range(4):
            slow = rank == 3 and step >= 2
            detector.add(rank, step, 0.10 + 0.01 * rank + (0.2 if slow else 0.0))
        found += [(step, f) for f in detector.judge()]
    # slow from step 2 (step 0, warm-up, is not judged): the third slow step in a row is
    # step 4; reported once
    assert [(s, rank, step) for s, (rank, step, _, _) in found] == [(4, 3, 4)]
    (_, (_, _, busy, median)) = found[0]
    assert abs(busy - 0.33) < 1e-9 and abs(median - 0.11) < 1e-9
    assert detector.slow_now == {3}


def test_noise_below_the_factor_and_broken_streaks_are_not_stragglers():
    detector = StragglerDetector(factor=1.5, steps=3, world_size=2)
    times = [(0.1, 0.16), (0.1, 0.16), (0.1, 0.14), (0.1, 0.16), (0.1, 0.16), (0.1, 0.1)]
    for step, pair in enumerate(times):
        for rank, busy in enumerate(pair):
            detector.add(rank, step, busy)
        assert detector.judge() == []


def test_a_step_is_judged_only_when_every_rank_reported_it():
    detector = StragglerDetector(factor=1.5, steps=1, world_size=3)
    for rank in range(3):
        detector.add(rank, 10, 0.9 if rank == 0 else 0.1)   # the first step (warm-up): not judged
    detector.add(0, 11, 0.1)
    detector.add(1, 11, 0.5)
    assert detector.judge() == []
    detector.add(2, 11, 0.1)
    assert [f[0] for f in detector.judge()] == [1]
    detector.add(2, 11, 0.9)             # a late duplicate of a judged step is ignored
    assert detector.judge() == [] and not detector.times


def write_beat(job_dir, content: dict) -> None:
    path = heartbeat_path(str(job_dir), content["rank"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(content, handle)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_watchdog_stops_the_frozen_rank_once_and_writes_one_event(tmp_path):
    host, pid = socket.gethostname(), os.getpid()     # a live local process for each rank
    clock, killed = FakeClock(), []
    dog = Watchdog(str(tmp_path), hang_timeout_s=TIMEOUT, straggler_factor=1.5,
                   straggler_steps=2, max_failures=3, kill=lambda b: killed.append(b) or "killed",
                   clock=clock)
    events = []
    for t in range(12):
        clock.now = float(t)
        for rank in range(2):
            n = t if rank == 0 else min(t, 2)
            write_beat(tmp_path, beat(rank, n, n, pid=pid, world=2, host=host, phase="backward",
                                      axes=("tp", "ep"), step=min(t, 2) + 5))
        events += dog.read()
    assert [e["type"] for e in events] == ["hang"] and [b["rank"] for b in killed] == [1]
    assert events[0]["message"].startswith(
        f"rank 1 on {host} stopped in backward (collectives on tp, ep) at step 7: "
        f"no heartbeat for 6.0 s (cluster.hang_timeout_s=5); killed")
    (line,) = (tmp_path / "faults.jsonl").read_text().splitlines()
    assert json.loads(line)["rank"] == 1


def test_watchdog_ignores_beats_of_an_older_group_and_ranks_that_left(tmp_path):
    host, clock = socket.gethostname(), FakeClock()
    dog = Watchdog(str(tmp_path), hang_timeout_s=TIMEOUT, straggler_factor=1.5,
                   straggler_steps=2, max_failures=3, kill=lambda b: "killed", clock=clock)
    write_beat(tmp_path, beat(0, 1, 1, pid=os.getpid(), host=host, group="new", started=10.0))
    write_beat(tmp_path, beat(1, 1, 1, pid=os.getpid(), host=host, group="old", started=1.0))
    write_beat(tmp_path, beat(2, 1, 1, pid=os.getpid(), host=host, group="new", started=9.0,
                              phase="exited"))
    assert [b["rank"] for b in dog.current_beats()] == [0]


def test_watchdog_reports_a_straggler_from_the_step_times_in_the_beats(tmp_path):
    host, clock = socket.gethostname(), FakeClock()
    dog = Watchdog(str(tmp_path), hang_timeout_s=TIMEOUT, straggler_factor=1.5,
                   straggler_steps=2, max_failures=3, kill=lambda b: "killed", clock=clock)
    events = []
    for t in range(4):
        clock.now = float(t)
        for rank in range(3):
            busy = 0.3 if rank == 2 else 0.1
            times = [[s, 0.5, busy] for s in range(max(0, t - 1), t + 1)]   # beats overlap
            write_beat(tmp_path, beat(rank, t, t, pid=os.getpid(), host=host, world=3,
                                      step_times=times))
        events += dog.read()
    # step 0 is warm-up; steps 1 and 2 are the two slow steps in a row
    assert [(e["type"], e["rank"], e["step"]) for e in events] == [("straggler", 2, 2)]
    assert "3.0x the median of the other ranks" in events[0]["message"]


def test_a_rank_that_cannot_be_stopped_is_named_once(tmp_path):
    """A hung rank on another host: the driver cannot signal it; one line, not one per timeout."""
    clock = FakeClock()
    dog = Watchdog(str(tmp_path), hang_timeout_s=TIMEOUT, straggler_factor=1.5,
                   straggler_steps=2, max_failures=0, clock=clock)    # the real kill_local
    events = []
    for t in range(30):
        clock.now = float(t)
        write_beat(tmp_path, beat(0, t, t, pid=os.getpid(), host=socket.gethostname()))
        write_beat(tmp_path, beat(1, 0, 0, pid=4242, host="other-host"))
        events += dog.read()
    assert [e["rank"] for e in events] == [1]
    assert events[0]["message"].endswith(
        "cannot signal host other-host: its collectives time out instead: "
        "the job fails (cluster.max_failures=0)")


class MetricsTracker:
    """Records what the observer sends to MLflow for fault events."""

    def __init__(self):
        self.metrics, self.tags = [], {}

    def log_metric(self, key, value, step):
        self.metrics.append((key, value, step))

    def set_tag(self, key, value):
        self.tags[key] = value


def test_fault_events_are_one_warning_each_and_mlflow_counts(capsys):
    from orchestrator.observer import JobObserver
    from orchestrator.progress import ProgressDisplay

    tracker = MetricsTracker()
    observer = JobObserver(total_steps=10, tracker=tracker, progress=ProgressDisplay(10, live=False),
                           metrics_jsonl=None, layout_groups=lambda world: {}, driver_start=0.0)
    events = [("straggler", 3, 4, {"stragglers": [3]}), ("straggler", 1, 6, {"stragglers": [1, 3]}),
              ("hang", 2, 7, {"hangs": 1})]
    for kind, rank, step, extra in events:
        text = f"straggler: rank {rank}" if kind == "straggler" else "rank 2 on h stopped in x"
        observer.handle({"type": kind, "rank": rank, "step": step, "message": text, **extra})
    assert tracker.metrics == [("faults/stragglers", 1, 4), ("faults/stragglers", 2, 6),
                               ("faults/hangs", 1, 7)]
    assert tracker.tags == {"foldmoe.straggler_ranks": "1,3"}
    assert observer.hang_cause() == "rank 2 on h stopped in x"
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: straggler: rank 3", "warning: straggler: rank 1",
                   "warning: rank 2 on h stopped in x"]
