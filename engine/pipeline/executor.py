"""Runs one PP rank's action list: forwards, backwards and the p2p exchanges between them.

Exchanges are posted without waiting; a compute waits for the exchange that holds its
input (the activation or the output gradient) just before it runs, and the sends are
waited for at the end. So what the schedule posts one compute ahead (the interleaved
steady state) transfers while that compute runs (engine/pipeline/schedules.py).

Loss convention (docs/architecture.md, "Loss normalisation"): `loss_fn` already divides by the global token count, so the
executor backpropagates each micro-batch loss as is (no 1/m scaling) and parameter grads
accumulate over micro-batches in `.grad`.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Callable, Sequence

import torch
from torch import nn

from engine.parallel.axes import Axis
from engine.parallel.traffic import Link

from .bubble import TimedAction
from .comm import StageP2P
from .schedules import Action, ScheduleError, comm_steps, peer_of, rank_of_chunk

LossFn = Callable[[torch.Tensor, dict], torch.Tensor]


class PipelineExecutor:
    """chunks: this rank's model chunks in virtual-stage order (global chunk v * pp + r);
    mesh: a FoldedMesh (or None when pp == 1); schedule_actions: this rank's program
    (`build_schedule(...)[mesh.pp_rank]`); activation_shape: [mbs, s_local, h]."""

    def __init__(self, chunks: Sequence[nn.Module], mesh, schedule_actions: Sequence[Action],
                 loss_fn: LossFn, activation_shape: Sequence[int], dtype: torch.dtype,
                 device: torch.device | str | None = None):
        self.chunks = list(chunks)
        self.pp = 1 if mesh is None else mesh.size("pp")
        self.rank = 0 if mesh is None else mesh.rank_in("pp")
        self.num_chunks = self.pp * len(self.chunks)
        self.actions = list(schedule_actions)
        self.loss_fn = loss_fn
        self._check_actions()
        # A forward-only program (evaluation) keeps nothing for a backward: each chunk's
        # output is released once sent, not held for the whole run.
        self.keeps_for_backward = any(a.kind == "B" for a in self.actions)
        self.p2p = None
        if self.pp > 1:
            device = device if device is not None else _device_of(self.chunks)
            self.p2p = StageP2P(mesh.group(Axis.PP), activation_shape, dtype,
                                Link(mesh.traffic, Axis.PP), device)
            self._global_ranks = mesh.ranks("pp")
        self.timeline: list[TimedAction] = []        # compute actions, perf_counter seconds
        self.comm_timeline: list[TimedAction] = []   # exchange postings; waits, as their receive

    @property
    def num_microbatches(self) -> int:
        return 1 + max(a.microbatch for a in self.actions)

    @property
    def is_last_stage(self) -> bool:
        return rank_of_chunk(self.num_chunks - 1, self.pp) == self.rank

    def _check_actions(self) -> None:
        if not self.actions:
            raise ScheduleError("pipeline executor: empty action list")
        for action in self.actions:
            if not 0 <= action.chunk < self.num_chunks or rank_of_chunk(action.chunk, self.pp) != self.rank:
                raise ScheduleError(
                    f"pipeline executor on PP rank {self.rank} (pp={self.pp}, {len(self.chunks)} chunks): "
                    f"{action} belongs to another rank; pass build_schedule(...)[pp_rank]")

    def run(self, microbatches: Sequence[dict]) -> list[torch.Tensor | None]:
        """Runs the program once; returns detached per-micro-batch losses on the last stage
        and Nones elsewhere."""
        if len(microbatches) != self.num_microbatches:
            raise ValueError(f"pipeline executor: the schedule has {self.num_microbatches} "
                             f"micro-batches, got {len(microbatches)}")
        self._state = _RunState(microbatches)
        self.timeline, self.comm_timeline = [], []
        for step in comm_steps(self.actions):
            if isinstance(step, Action):
                self._wait_inputs(step)
                start = time.perf_counter()
                (self._forward if step.kind == "F" else self._backward)(step)
                self.timeline.append(TimedAction(step, start, time.perf_counter()))
            else:
                start = time.perf_counter()
                self._post(step)
                end = time.perf_counter()
                self.comm_timeline += [TimedAction(a, start, end) for a in step]
        for pending in self._state.posted:   # the sends (receives were waited for before use)
            pending.wait()
        losses, self._state = self._state.losses, None
        return losses if self.is_last_stage else [None] * len(microbatches)

    def _forward(self, action: Action) -> None:
        state, i, c = self._state, action.microbatch, action.chunk
        batch = state.microbatches[i]
        if c == 0:
            x = batch["inputs"]
        else:
            x = state.received.pop(("F", i, c))
            if self.keeps_for_backward:
                state.inputs[(i, c)] = x.requires_grad_()
        out = self.chunks[c // self.pp](x, batch["positions"])
        if c == self.num_chunks - 1:
            out = self.loss_fn(out, batch)
            state.losses[i] = out.detach()
        else:
            state.to_send[("F", i, c)] = out
        if self.keeps_for_backward:
            state.outputs[(i, c)] = out

    def _backward(self, action: Action) -> None:
        state, i, c = self._state, action.microbatch, action.chunk
        out = state.outputs.pop((i, c))
        if c == self.num_chunks - 1:
            torch.autograd.backward(out)
        else:
            torch.autograd.backward(out, grad_tensors=state.received.pop(("B", i, c)))
        if c > 0:
            x = state.inputs.pop((i, c))
            state.to_send[("B", i, c)] = x.grad if x.grad is not None else torch.zeros_like(x)

    def _post(self, run: list[Action]) -> None:
        """Posts one exchange without waiting (engine/pipeline/schedules.py, `_with_comm`)."""
        state = self._state
        sends, receives = [], []
        for action in run:
            peer = self._global_ranks[peer_of(action, self.pp)]
            direction = action.kind[-1]   # F | B
            if action.kind.startswith("SEND"):
                sends.append((peer, state.to_send.pop((direction, action.microbatch, action.chunk))))
            else:
                receives.append((peer, action))
        tensors, pending = self.p2p.post(sends, [peer for peer, _ in receives])
        state.posted.append(pending)
        for (_, action), tensor in zip(receives, tensors):
            key = (action.kind[-1], action.microbatch, action.chunk)
            state.received[key] = tensor
            state.pending[key] = (pending, action)

    def _wait_inputs(self, action: Action) -> None:
        """Waits for the exchange holding what `action` consumes, timed as that receive, and
        for every exchange posted before it: NCCL runs a rank's exchanges in order, so they
        are done already, and their sent tensors are released here rather than at the end."""
        key = (action.kind, action.microbatch, action.chunk)
        pending, receive = self._state.pending.pop(key, (None, None))
        if pending is None or pending.waited:
            return
        start = time.perf_counter()
        posted = self._state.posted
        while posted:
            first = posted.popleft()
            first.wait()
            if first is pending:
                break
        self.comm_timeline.append(TimedAction(receive, start, time.perf_counter()))


class _RunState:
    """Tensors alive during one run, keyed by (micro-batch, chunk)."""

    def __init__(self, microbatches: Sequence[dict]):
        self.microbatches = microbatches
        self.losses: list[torch.Tensor | None] = [None] * len(microbatches)
        self.inputs: dict = {}      # received activations (leaves whose .grad is sent back)
        self.outputs: dict = {}     # chunk outputs, or the loss on the last chunk
        self.received: dict = {}    # ("F"|"B", i, c) -> tensor received for chunk c
        self.pending: dict = {}     # ("F"|"B", i, c) -> (PendingExchange, its receive action)
        self.posted: deque = deque()   # PendingExchanges not yet waited for, in posting order
        self.to_send: dict = {}     # ("F"|"B", i, c) -> tensor produced by chunk c


def _device_of(chunks: Sequence[nn.Module]) -> torch.device:
    for chunk in chunks:
        for param in chunk.parameters():
            return param.device
    return torch.device("cpu")
