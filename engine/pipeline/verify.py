"""Schedule verification without communication: ordering, in-order p2p pairing and a
timed simulation of blocking batched exchanges that detects deadlock.

Exchange model: a run of consecutive communication actions is posted at once (as the
executor's `batch_isend_irecv`) and the rank waits until every op of the run has met its
peer op; a send and a receive meet when both are posted (rendezvous, the worst case).
Ops between a pair of ranks match in posting order (NCCL ignores tags), so the send
sequence of src->dst must equal the receive sequence of dst from src.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable

from .bubble import TimedAction
from .schedules import Action, ScheduleError, comm_steps, peer_of, rank_of_chunk

Key = tuple[str, int, int]   # (direction F|B, microbatch, receiving chunk)


def peer_and_key(action: Action, pp: int) -> tuple[int, Key]:
    """The peer rank of a communication action and the key both ends agree on."""
    i, c = action.microbatch, action.chunk
    key = {"SEND_F": ("F", i, c + 1), "RECV_F": ("F", i, c),
           "SEND_B": ("B", i, c - 1), "RECV_B": ("B", i, c)}[action.kind]
    return peer_of(action, pp), key


def check_program(program: list[Action], rank: int, pp: int, num_chunks: int, m: int) -> None:
    """Each owned (micro-batch, chunk) has one F then one B, with its receives before and
    its sends after the compute."""
    owned = {c for c in range(num_chunks) if rank_of_chunk(c, pp) == rank}
    done: set[tuple[str, int, int]] = set()
    for action in program:
        i, c = action.microbatch, action.chunk
        if c not in owned or not 0 <= i < m:
            raise ScheduleError(f"rank {rank}: {action} is not a (micro-batch, chunk) of this rank")
        needs = {"F": ["RECV_F"] if c > 0 else [],
                 "B": ["F"] + (["RECV_B"] if c < num_chunks - 1 else []),
                 "SEND_F": ["F"], "SEND_B": ["B"], "RECV_F": [], "RECV_B": []}[action.kind]
        for kind in needs:
            if (kind, i, c) not in done:
                raise ScheduleError(f"rank {rank}: {action} comes before {kind}{i}@{c}")
        if (action.kind, i, c) in done:
            raise ScheduleError(f"rank {rank}: {action} appears twice")
        done.add((action.kind, i, c))
    for c in owned:
        for i in range(m):
            for kind in ("F", "B"):
                if (kind, i, c) not in done:
                    raise ScheduleError(f"rank {rank}: {kind}{i}@{c} is missing")


def check_pairing(programs: list[list[Action]]) -> None:
    """Sends src->dst and receives at dst from src list the same keys in the same order."""
    pp = len(programs)
    sends: dict[tuple[int, int], list[Key]] = defaultdict(list)
    recvs: dict[tuple[int, int], list[Key]] = defaultdict(list)
    for rank, program in enumerate(programs):
        for action in program:
            if action.is_compute:
                continue
            peer, key = peer_and_key(action, pp)
            if action.kind.startswith("SEND"):
                sends[(rank, peer)].append(key)
            else:
                recvs[(peer, rank)].append(key)
    for pair in set(sends) | set(recvs):
        if sends[pair] != recvs[pair]:
            raise ScheduleError(
                f"p2p {pair[0]}->{pair[1]}: sends {sends[pair]} do not match receives {recvs[pair]} in order")


def simulate(programs: list[list[Action]], cost: Callable[[Action], float] | None = None,
             ) -> list[list[TimedAction]]:
    """Runs all programs on a shared clock; compute takes cost(action) (default F=1, B=2),
    exchanges take no time but block until matched. Raises ScheduleError on deadlock.
    Returns per-rank compute timelines."""
    cost = cost or (lambda a: 1.0 if a.kind == "F" else 2.0)
    pp = len(programs)
    steps = [list(comm_steps(p)) for p in programs]
    pc, clock = [0] * pp, [0.0] * pp
    posted: dict[tuple[str, Key], float] = {}   # ("SEND"|"RECV", key) -> post time
    timelines: list[list[TimedAction]] = [[] for _ in range(pp)]
    while any(pc[r] < len(steps[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            while pc[r] < len(steps[r]):
                step = steps[r][pc[r]]
                if isinstance(step, Action):
                    timelines[r].append(TimedAction(step, clock[r], clock[r] + cost(step)))
                    clock[r] += cost(step)
                else:
                    done_at = _exchange(step, pp, clock[r], posted)
                    if done_at is None:
                        break
                    clock[r] = done_at
                pc[r] += 1
                progressed = True
        if not progressed:
            raise ScheduleError("deadlock: " + "; ".join(
                f"rank {r} waits in {' '.join(map(str, steps[r][pc[r]]))}"
                for r in range(pp) if pc[r] < len(steps[r])))
    return timelines


def _exchange(run: list[Action], pp: int, now: float, posted: dict) -> float | None:
    """Posts the run's ops (once) and returns its completion time, or None if some op's
    peer has not been posted yet."""
    ops = [("SEND" if a.kind.startswith("SEND") else "RECV", peer_and_key(a, pp)[1]) for a in run]
    for op in ops:
        posted.setdefault(op, now)
    done_at = now
    for side, key in ops:
        other = posted.get(("RECV" if side == "SEND" else "SEND", key))
        if other is None:
            return None
        done_at = max(done_at, posted[(side, key)], other)
    return done_at


def peak_in_flight(program: list[Action]) -> int:
    """Most chunk activations held at once: forwards done whose backward has not run."""
    live = peak = 0
    for action in program:
        if action.kind == "F":
            live += 1
            peak = max(peak, live)
        elif action.kind == "B":
            live -= 1
    return peak


def check_schedule(programs: list[list[Action]], num_chunks: int, m: int) -> list[list[TimedAction]]:
    """All checks; returns the unit-cost simulated timelines."""
    pp = len(programs)
    for rank, program in enumerate(programs):
        check_program(program, rank, pp, num_chunks, m)
    check_pairing(programs)
    return simulate(programs)
