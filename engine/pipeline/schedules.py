"""Pipeline schedules as pure per-rank action lists (no communication, no torch).

A schedule is `list[list[Action]]`, one program per PP rank. Compute actions are F and B
of one micro-batch on one model chunk; communication actions name the tensor they move.
Chunk ids are global: chunk c = v * pp + r runs on PP rank r as its virtual stage v
(Megatron's interleaving, Narayanan et al. 2021, arXiv 2104.04473).

Communication placement: the compute order is cut into slots (one compute each for
GPipe and 1F1B; (F, B) pairs in the interleaved steady state). After each compute comes one
exchange: what it produced, and the receives of the next slot that it hands over to
(`_with_comm`). The executor posts each run of consecutive communication actions as one
`batch_isend_irecv` without waiting, and waits for a received tensor only when a compute
consumes it; so in the interleaved steady state the exchange after F runs behind B and
the one after B behind the next F (Megatron's overlap_p2p_comm), while in a one-compute
slot the next compute waits at once. `verify.check_schedule` proves, by simulating those
semantics (with NCCL's in-order execution of a rank's exchanges), that the exchanges of
all ranks pair up in order without deadlock.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from engine.config.train import pipeline_schedule_for

COMPUTE_KINDS = ("F", "B")
COMM_KINDS = ("SEND_F", "RECV_F", "SEND_B", "RECV_B")


class ScheduleError(ValueError):
    """An impossible schedule request, or a schedule that fails verification."""


@dataclass(frozen=True)
class Action:
    """kind: F | B | SEND_F | RECV_F | SEND_B | RECV_B; chunk: global chunk id.

    For communication, `chunk` is the local chunk the tensor belongs to: SEND_F carries the
    output of `chunk`, RECV_F the input of `chunk`, SEND_B the input grad of `chunk`,
    RECV_B the output grad of `chunk`."""

    kind: str
    microbatch: int
    chunk: int

    def __post_init__(self) -> None:
        if self.kind not in COMPUTE_KINDS + COMM_KINDS:
            raise ScheduleError(f"unknown action kind {self.kind!r}")

    @property
    def is_compute(self) -> bool:
        return self.kind in COMPUTE_KINDS

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}@{self.chunk}"


def format_actions(actions: list[Action], *, compute_only: bool = True, show_chunk: bool = True) -> str:
    """`F0 F1 B0 ...` (with `@chunk` when show_chunk)."""
    picked = [a for a in actions if a.is_compute or not compute_only]
    return " ".join(str(a) if show_chunk else f"{a.kind}{a.microbatch}" for a in picked)


def rank_of_chunk(chunk: int, pp: int) -> int:
    return chunk % pp


def peer_of(action: Action, pp: int) -> int:
    """PP rank at the other end of a communication action (a ring: with interleaving the
    last rank feeds chunk (v + 1) * pp on rank 0)."""
    c = action.chunk
    if action.kind in ("SEND_F", "RECV_B"):
        return rank_of_chunk(c + 1, pp)
    if action.kind in ("RECV_F", "SEND_B"):
        return rank_of_chunk(c - 1, pp)
    raise ScheduleError(f"{action} is not a communication action")


def chunks_of_rank(rank: int, pp: int, vpp: int) -> list[int]:
    """Global chunk ids held by PP rank `rank`, in virtual-stage order."""
    return [v * pp + rank for v in range(vpp)]


def comm_steps(actions: list[Action]) -> Iterator[Action | list[Action]]:
    """Yields compute actions one by one and each maximal run of communication actions as
    one list (one batched exchange)."""
    run: list[Action] = []
    for action in actions:
        if action.is_compute:
            if run:
                yield run
                run = []
            yield action
        else:
            run.append(action)
    if run:
        yield run


# ---- compute orders -------------------------------------------------------------------

def _check_sizes(pp: int, m: int, vpp: int = 1) -> None:
    for key, value in (("parallel.pp", pp), ("number of micro-batches", m), ("parallel.vpp", vpp)):
        if not isinstance(value, int) or value < 1:
            raise ScheduleError(f"{key}={value!r}: must be a positive integer")


def _gpipe_order(pp: int, m: int, rank: int) -> list[Action]:
    # GPipe (Huang et al. 2019, arXiv 1811.06965): all forwards, then all backwards.
    return [Action("F", i, rank) for i in range(m)] + [Action("B", i, rank) for i in range(m)]


def _one_f_one_b_order(pp: int, m: int, rank: int) -> list[Action]:
    # PipeDream-flush / 1F1B (Narayanan et al. 2021, sec. 2.2): pp - r - 1 warm-up forwards,
    # then alternate one forward and one backward, then drain the backwards.
    warmup = min(pp - rank - 1, m)
    order = [Action("F", i, rank) for i in range(warmup)]
    for i in range(m - warmup):
        order += [Action("F", warmup + i, rank), Action("B", i, rank)]
    order += [Action("B", i, rank) for i in range(m - warmup, m)]
    return order


def interleaved_warmup(pp: int, vpp: int, m: int, rank: int) -> int:
    """Warm-up forwards of rank `rank` in interleaved 1F1B (Megatron-LM
    schedules.forward_backward_pipelining_with_interleaving): 2(pp - r - 1) + (vpp - 1) pp."""
    return min(2 * (pp - rank - 1) + (vpp - 1) * pp, m * vpp)


def _interleaved_chunk(k: int, pp: int, vpp: int, rank: int, forward: bool) -> Action:
    # Virtual micro-batch k walks groups of pp micro-batches through all vpp chunks;
    # backwards visit the chunks in reverse.
    group, in_group = divmod(k, pp * vpp)
    stage = in_group // pp
    if not forward:
        stage = vpp - 1 - stage
    microbatch = group * pp + in_group % pp
    return Action("F" if forward else "B", microbatch, stage * pp + rank)


def _interleaved_slots(pp: int, vpp: int, m: int, rank: int) -> list[list[Action]]:
    """Warm-up forwards one per slot, then (F, B) pairs that share one exchange after both
    computes (this pairing is what keeps the interleaved exchanges deadlock-free), then
    the remaining backwards one per slot."""
    total = m * vpp
    warmup = interleaved_warmup(pp, vpp, m, rank)
    slots = [[_interleaved_chunk(k, pp, vpp, rank, True)] for k in range(warmup)]
    for i in range(total - warmup):
        slots.append([_interleaved_chunk(warmup + i, pp, vpp, rank, True),
                      _interleaved_chunk(i, pp, vpp, rank, False)])
    slots += [[_interleaved_chunk(k, pp, vpp, rank, False)] for k in range(total - warmup, total)]
    return slots


# ---- communication --------------------------------------------------------------------

def _receives(action: Action, num_chunks: int) -> list[Action]:
    i, c = action.microbatch, action.chunk
    if action.kind == "F":
        return [Action("RECV_F", i, c)] if c > 0 else []
    return [Action("RECV_B", i, c)] if c < num_chunks - 1 else []


def _sends(action: Action, num_chunks: int) -> list[Action]:
    i, c = action.microbatch, action.chunk
    if action.kind == "F":
        return [Action("SEND_F", i, c)] if c < num_chunks - 1 else []
    return [Action("SEND_B", i, c)] if c > 0 else []


def _with_comm(slots: list[list[Action]], num_chunks: int) -> list[Action]:
    """After each compute, one exchange: its sends, and the receives of the next slot's
    actions it hands over to (Megatron's combined send_forward_recv_forward & co.): with a
    (F, B) slot the next F's input comes with this F's send and the next B's gradient with
    this B's send, so each transfer runs behind the other compute of the pair (Megatron's
    overlap_p2p_comm); a one-compute slot takes every receive of the next slot. The
    receives of the first slot go before it."""
    program: list[Action] = [r for a in slots[0] for r in _receives(a, num_chunks)] if slots else []
    for index, slot in enumerate(slots):
        following = slots[index + 1] if index + 1 < len(slots) else []
        for position, action in enumerate(slot):
            program.append(action)
            program += _sends(action, num_chunks)
            program += [r for b in following if _hand_over(b, slot) == position
                        for r in _receives(b, num_chunks)]
    return program


def _hand_over(action: Action, slot: list[Action]) -> int:
    """Position in `slot` after which `action`'s receives are posted: the compute of the
    same kind, else the slot's last."""
    for position, current in enumerate(slot):
        if current.kind == action.kind:
            return position
    return len(slot) - 1


def _single_slots(order: list[Action]) -> list[list[Action]]:
    return [[action] for action in order]


# ---- public constructors --------------------------------------------------------------

def gpipe(pp: int, m: int) -> list[list[Action]]:
    _check_sizes(pp, m)
    return [_with_comm(_single_slots(_gpipe_order(pp, m, r)), pp) for r in range(pp)]


def one_f_one_b(pp: int, m: int) -> list[list[Action]]:
    _check_sizes(pp, m)
    return [_with_comm(_single_slots(_one_f_one_b_order(pp, m, r)), pp) for r in range(pp)]


def interleaved_1f1b(pp: int, vpp: int, m: int) -> list[list[Action]]:
    _check_sizes(pp, m, vpp)
    if pp < 2 or vpp < 2:
        raise ScheduleError(
            f"interleaved 1F1B needs parallel.pp >= 2 and parallel.vpp >= 2 (got pp={pp}, vpp={vpp}); "
            "use train.pipeline_schedule=1f1b otherwise")
    if m % pp:
        raise ScheduleError(
            f"interleaved 1F1B with pp={pp} needs the micro-batches per DP rank "
            f"(train.global_batch_size / (train.micro_batch_size * dp) = {m}) to be a positive "
            f"multiple of pp={pp}; raise train.global_batch_size or lower train.micro_batch_size")
    return [_with_comm(_interleaved_slots(pp, vpp, m, r), pp * vpp) for r in range(pp)]


def build_schedule(name: str, pp: int, m: int, vpp: int = 1) -> list[list[Action]]:
    """The schedule `train.pipeline_schedule` names (rule in engine.config.train.
    pipeline_schedule_for: `auto` picks by vpp, an explicit name must fit vpp)."""
    try:
        name = pipeline_schedule_for(name, vpp)
    except ValueError as err:
        raise ScheduleError(str(err)) from None
    if name == "interleaved":
        return interleaved_1f1b(pp, vpp, m)
    return gpipe(pp, m) if name == "gpipe" else one_f_one_b(pp, m)
