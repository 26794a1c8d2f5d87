"""The driver's watchdog: reads every rank's heartbeat (workers/heartbeat.py), names a rank
that stopped making progress within cluster.hang_timeout_s and stops it, and reports
stragglers.

A hang is one of two things, both judged on the driver's own clock (the moment a beat's
counters were seen to change), so clock skew between hosts does not matter:
- no heartbeat: the rank's beat counter has not moved for hang_timeout_s (SIGSTOP, a dead
  host, a process wedged in the kernel). Its peers keep beating while they wait for it.
- no progress: every rank of the group still beats, but none has changed phase for
  hang_timeout_s (a deadlock, a stuck kernel); the rank furthest behind is named.
The named rank is then SIGKILLed (a stopped process receives SIGKILL too), on another Ray
node through a task pinned to that node (`kill_rank`). That turns a
hang into an ordinary worker failure: its peers' collectives fail at once, and the launcher
tears the group down and restarts it from the latest checkpoint, or fails the job, by
cluster.max_failures like any other failure.

A straggler is a rank whose busy time per step exceeds the median of the other ranks by
cluster.straggler_factor for cluster.straggler_steps consecutive steps.
"""
from __future__ import annotations

import glob
import os
import signal
import socket
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

from workers.events import EventWriter
from workers.heartbeat import ray_node_id, read_heartbeat

# Phases that beat but make no progress for as long as their I/O takes (a save of a large
# model to shared storage runs minutes, like a load); a hung collective inside them still
# raises after cluster.collective_timeout_s, a frozen rank still stops beating.
SETUP_PHASES = frozenset(("setup", "build", "load_checkpoint", "checkpoint"))
GONE_PHASES = frozenset(("exited", "failed"))
READ_INTERVAL_S = 0.5
KILL_TASK_TIMEOUT_S = 30.0    # placing and running the signalling task on another node


@dataclass
class _Seen:
    """What the driver knows of one rank of the current group (driver clock)."""

    beat: dict
    beat_at: float
    progress_at: float


def where(beat: dict) -> str:
    axes = beat.get("axes") or []
    comm = f"collectives on {', '.join(axes)}" if axes else "no collective"
    step = beat.get("step")
    at = f" at step {step}" if step is not None else " before the first step"
    return f"{beat.get('phase', '?')} ({comm}){at}"


@dataclass
class HangDetector:
    """Pure: feed it the current beats and the time; it returns the hung rank, if any."""

    timeout_s: float
    seen: dict[int, _Seen] = field(default_factory=dict)

    def observe(self, beats: list[dict], now: float) -> tuple[dict, str] | None:
        """beats: the newest beat of each rank of the current group, ranks that left on
        purpose excluded. Returns (beat, why) of the rank to stop, or None."""
        for beat in beats:
            old = self.seen.get(beat["rank"])
            if old is None or old.beat["pid"] != beat["pid"]:
                self.seen[beat["rank"]] = _Seen(beat, now, now)
                continue
            if beat["beat"] != old.beat["beat"]:
                old.beat_at = now
            if beat["progress"] != old.beat["progress"]:
                old.progress_at = now
            old.beat = beat
        current = [self.seen[b["rank"]] for b in beats]
        if not current:
            return None
        silent = max(current, key=lambda s: now - s.beat_at)
        if now - silent.beat_at > self.timeout_s:
            return silent.beat, f"no heartbeat for {now - silent.beat_at:.1f} s"
        if any(s.beat.get("phase") in SETUP_PHASES for s in current):
            return None
        if now - max(s.progress_at for s in current) > self.timeout_s:
            behind = min(current, key=lambda s: (s.beat.get("step") or 0, s.progress_at))
            return behind.beat, (f"no progress for {now - behind.progress_at:.1f} s, "
                                 f"every rank alive")
        return None

    def forget(self, rank: int) -> None:
        self.seen.pop(rank, None)


@dataclass
class StragglerDetector:
    """Pure: feed it (rank, step, busy_s) as they arrive; it returns ranks that just became
    stragglers. A step is judged once every rank of the world has reported it."""

    factor: float
    steps: int
    world_size: int = 0
    times: dict[int, dict[int, float]] = field(default_factory=dict)   # step -> rank -> busy s
    streak: dict[int, int] = field(default_factory=dict)
    reported: set[int] = field(default_factory=set)
    judged_up_to: int = -1
    slow_now: set[int] = field(default_factory=set)
    first_step: int | None = None

    def add(self, rank: int, step: int, busy_s: float) -> None:
        if self.first_step is None:
            self.first_step = step     # every rank of a group starts at the same step
        # The group's first step is warm-up (allocations, lazy initialisation): not judged.
        if step > max(self.judged_up_to, self.first_step):
            self.times.setdefault(step, {})[rank] = busy_s

    def judge(self) -> list[tuple[int, int, float, float]]:
        """(rank, step, its busy s, the others' median) of each rank that has been slow for
        `steps` consecutive steps, once per rank."""
        found = []
        for step in sorted(s for s, t in self.times.items() if len(t) >= self.world_size > 1):
            by_rank = self.times.pop(step)
            self.judged_up_to = max(self.judged_up_to, step)
            self.slow_now = set()
            for rank, busy in by_rank.items():
                others = statistics.median(v for r, v in by_rank.items() if r != rank)
                slow = others > 0 and busy > self.factor * others
                self.streak[rank] = self.streak.get(rank, 0) + 1 if slow else 0
                if self.streak[rank] >= self.steps:
                    self.slow_now.add(rank)
                    if rank not in self.reported:
                        self.reported.add(rank)
                        found.append((rank, step, busy, others))
        for step in [s for s in self.times if s < self.judged_up_to]:
            del self.times[step]       # a rank that missed a step: never complete
        return found


def _local_pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def kill_rank(beat: dict) -> str:
    """SIGKILLs a hung rank; returns what was done, for the message. A rank on another Ray
    node than this driver (another host, another KubeRay pod) is signalled by a task pinned
    to its node; any other on this host directly."""
    node = beat.get("node_id")
    if node and node != ray_node_id():
        return kill_on_ray_node(node, int(beat["pid"]))
    return kill_local(beat)


def kill_on_ray_node(node_id: str, pid: int, timeout_s: float = KILL_TASK_TIMEOUT_S) -> str:
    """SIGKILL to `pid` from a 0-CPU Ray task pinned to `node_id` (it runs even when the
    workers hold every CPU of the node)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def sigkill(target: int) -> bool:    # nested: pickled by value, needs nothing installed
        import os as remote_os
        import signal as remote_signal
        try:
            remote_os.kill(target, remote_signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True

    task = ray.remote(num_cpus=0, max_retries=0)(sigkill).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
    where = f"Ray node {node_id[:12]}"
    try:
        killed = ray.get(task.remote(pid), timeout=timeout_s)
    except Exception as err:   # node gone, task not placed in time: the peers time out instead
        return f"could not signal it on {where} ({type(err).__name__}): its collectives time out instead"
    return f"killed pid {pid} on {where}" if killed else f"pid {pid} on {where} had already exited"


def kill_local(beat: dict) -> str:
    """SIGKILLs a rank on this host; returns what was done, for the message."""
    if beat.get("host") != socket.gethostname():
        return f"cannot signal host {beat.get('host')}: its collectives time out instead"
    try:
        os.kill(int(beat["pid"]), signal.SIGKILL)
    except ProcessLookupError:
        return "it already exited"
    return f"killed pid {beat['pid']}"


def group_of(beat: dict) -> str:
    return beat.get("group", "")


class Watchdog:
    """Reads JOB_DIR/workers/rank*.heartbeat.json; `read()` returns the job's fault events
    ("hang", "straggler") like an EventTail, and appends them to JOB_DIR/faults.jsonl."""

    def __init__(self, job_dir: str, *, hang_timeout_s: float, straggler_factor: float,
                 straggler_steps: int, max_failures: int,
                 kill: Callable[[dict], str] = kill_rank, clock: Callable[[], float] = time.monotonic):
        self.pattern = os.path.join(job_dir, "workers", "rank*.heartbeat.json")
        self.writer = EventWriter(os.path.join(job_dir, "faults.jsonl"))
        self.hangs = HangDetector(hang_timeout_s)
        self.stragglers = StragglerDetector(straggler_factor, straggler_steps)
        self.max_failures = max_failures
        self.kill, self.clock = kill, clock
        self._group: str | None = None
        self._last_read = float("-inf")
        self.hang_count = 0
        self._stopped: set[tuple[str, int]] = set()    # (host, pid) already named: once each

    @classmethod
    def for_run(cls, run, job_dir: str) -> "Watchdog":
        c = run.schema.cluster
        return cls(job_dir, hang_timeout_s=c.hang_timeout_s, straggler_factor=c.straggler_factor,
                   straggler_steps=c.straggler_steps, max_failures=c.max_failures)

    def current_beats(self) -> list[dict]:
        """The beats of the newest worker group (the group of the most recently started
        rank), without ranks that left on purpose or whose process is gone."""
        beats = [b for b in map(read_heartbeat, glob.glob(self.pattern)) if b is not None]
        if not beats:
            return []
        group = group_of(max(beats, key=lambda b: b["started"]))
        if group != self._group:
            self._group = group
            self.hangs = HangDetector(self.hangs.timeout_s)
            self.stragglers = StragglerDetector(self.stragglers.factor, self.stragglers.steps)
        here = socket.gethostname()
        return [b for b in beats if group_of(b) == group and b.get("phase") not in GONE_PHASES
                and (b.get("host"), b["pid"]) not in self._stopped
                and (b.get("host") != here or _local_pid_alive(int(b["pid"])))]

    def read(self) -> list[dict]:
        now = self.clock()
        if now - self._last_read < READ_INTERVAL_S:
            return []
        self._last_read = now
        beats = self.current_beats()
        events = self._stragglers(beats)
        hung = self.hangs.observe(beats, now)
        if hung is not None:
            events.append(self._stop(*hung))
        for event in events:
            self.writer.write(event["type"], **{k: v for k, v in event.items() if k != "type"})
        return events

    def _stop(self, beat: dict, why: str) -> dict:
        self.hang_count += 1
        self._stopped.add((beat.get("host"), beat["pid"]))
        done = self.kill(beat)
        self.hangs.forget(beat["rank"])
        then = ("the job fails (cluster.max_failures=0)" if self.max_failures == 0 else
                f"the group restarts from the latest checkpoint if cluster.max_failures="
                f"{self.max_failures} allows")
        message = (f"rank {beat['rank']} on {beat.get('host')} stopped in {where(beat)}: {why} "
                   f"(cluster.hang_timeout_s={self.hangs.timeout_s:g}); {done}: {then}")
        return {"type": "hang", "rank": beat["rank"], "host": beat.get("host"),
                "pid": beat["pid"], "phase": beat.get("phase"), "axes": beat.get("axes"),
                "step": beat.get("step"), "why": why, "hangs": self.hang_count,
                "message": message}

    def _stragglers(self, beats: list[dict]) -> list[dict]:
        detector = self.stragglers
        detector.world_size = max((b.get("world_size", 0) for b in beats), default=0)
        hosts = {b["rank"]: b.get("host") for b in beats}
        for beat in beats:
            for step, _wall_s, busy_s in beat.get("step_times", []):
                detector.add(beat["rank"], step, busy_s)
        events = []
        for rank, step, busy, median in detector.judge():
            events.append({"type": "straggler", "rank": rank, "host": hosts.get(rank),
                           "step": step, "busy_s": busy, "median_s": median,
                           "stragglers": sorted(detector.slow_now),
                           "message": (f"straggler: rank {rank} on {hosts.get(rank)} took "
                                       f"{busy:.3g} s of work at step {step}, "
                                       f"{busy / median:.1f}x the median of the other ranks "
                                       f"({median:.3g} s), for {detector.steps} steps in a row "
                                       f"(cluster.straggler_factor={detector.factor:g})")})
        return events
