"""Schedule verification without communication: ordering, in-order p2p pairing and a
timed simulation of blocking batched exchanges that detects deadlock.

Exchange model (the executor's): a run of consecutive communication actions is posted at
once, as one `batch_isend_irecv`, without waiting; a rank's exchanges then run one after
another, as NCCL executes a communicator's work in order (gloo has no such order, so a
schedule that passes here also runs there); an op completes when its peer op is in a
running exchange (rendezvous, the worst case), and an exchange when all its ops have. A
compute waits only for the exchanges that hold its receives, and a rank's sends are
waited for at the end of the run. Ops between a pair of ranks match in posting order
(NCCL ignores tags), so the send sequence of src->dst must equal the receive sequence of
dst from src.
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
             transfer: float = 0.0) -> list[list[TimedAction]]:
    """Runs all programs on a shared clock; compute takes cost(action) (default F=1, B=2),
    an exchange `transfer` once its ops have met. Raises ScheduleError on deadlock.
    Returns per-rank compute timelines. The semantics are the executor's (module docstring)."""
    cost = cost or (lambda a: 1.0 if a.kind == "F" else 2.0)
    sim = _Simulation(programs, transfer)
    while not sim.finished():
        progressed = sim.resolve_exchanges()
        for r in range(sim.pp):
            progressed |= sim.advance(r, cost)
        if not progressed:
            raise ScheduleError("deadlock: " + sim.describe_wait())
    return sim.timelines


class _Exchange:
    def __init__(self, rank: int, ops: list[tuple[str, Key]], posted_at: float):
        self.rank, self.ops, self.posted_at = rank, ops, posted_at
        self.start: float | None = None    # when the rank's earlier exchanges are done
        self.done: float | None = None     # when every op has met its peer's


class _Simulation:
    """Posting never blocks; a rank's exchanges run one after another (NCCL executes a
    communicator's work in order); an exchange is done once each of its ops' peer ops is in
    a running exchange; a compute starts when the exchanges holding its receives are done."""

    def __init__(self, programs: list[list[Action]], transfer: float):
        self.pp, self.transfer = len(programs), transfer
        self.steps = [list(comm_steps(p)) for p in programs]
        self.pc, self.clock = [0] * self.pp, [0.0] * self.pp
        self.exchanges: list[list[_Exchange]] = [[] for _ in range(self.pp)]
        self.where: dict[tuple[str, Key], _Exchange] = {}   # (SEND|RECV, key) -> its exchange
        self.timelines: list[list[TimedAction]] = [[] for _ in range(self.pp)]

    def finished(self) -> bool:
        return all(self.pc[r] == len(self.steps[r]) for r in range(self.pp)) and all(
            x.done is not None for xs in self.exchanges for x in xs)

    def advance(self, r: int, cost) -> bool:
        moved = False
        while self.pc[r] < len(self.steps[r]):
            step = self.steps[r][self.pc[r]]
            if not isinstance(step, Action):
                ops = [("SEND" if a.kind.startswith("SEND") else "RECV", peer_and_key(a, self.pp)[1])
                       for a in step]
                exchange = _Exchange(r, ops, self.clock[r])
                self.exchanges[r].append(exchange)
                self.where.update({op: exchange for op in ops})
            else:
                ready = self._inputs_ready(r, step)
                if ready is None:
                    break
                begin = max(self.clock[r], ready)
                self.timelines[r].append(TimedAction(step, begin, begin + cost(step)))
                self.clock[r] = begin + cost(step)
            self.pc[r] += 1
            moved = True
        return moved

    def _inputs_ready(self, r: int, action: Action) -> float | None:
        """When the receives `action` consumes are done (None: not yet known)."""
        kind = "RECV_F" if action.kind == "F" else "RECV_B"
        key = peer_and_key(Action(kind, action.microbatch, action.chunk), self.pp)[1]
        exchange = self.where.get(("RECV", key))
        if exchange is None:
            # No receive posted: the first chunk's F and the last chunk's B need none.
            return self.clock[r]
        return exchange.done

    def resolve_exchanges(self) -> bool:
        moved = False
        for r in range(self.pp):
            previous_done = 0.0
            for exchange in self.exchanges[r]:
                if exchange.done is not None:
                    previous_done = exchange.done
                    continue
                if exchange.start is None:
                    exchange.start = max(exchange.posted_at, previous_done)
                    moved = True
                peers = [self.where.get(("RECV" if side == "SEND" else "SEND", key)) for side, key in exchange.ops]
                if any(p is None or p.start is None for p in peers):
                    break          # later exchanges of this rank wait for this one
                exchange.done = max([exchange.start] + [p.start for p in peers]) + self.transfer
                previous_done = exchange.done
                moved = True
        return moved

    def describe_wait(self) -> str:
        out = []
        for r in range(self.pp):
            stuck = next((x for x in self.exchanges[r] if x.done is None), None)
            if stuck is not None:
                out.append(f"rank {r} exchange {' '.join(f'{s}{k}' for s, k in stuck.ops)} is unmatched")
            elif self.pc[r] < len(self.steps[r]):
                out.append(f"rank {r} waits before {self.steps[r][self.pc[r]]}")
        return "; ".join(out)


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
