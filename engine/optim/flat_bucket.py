"""One bucket's tensors and collectives.

- param_buffer (model dtype): the model params are views into it, so the ZeRO-1
  all-gather writes the updated params in place;
- grad_buffer (fp32): the `main_grad` of each param, accumulated over micro-batches by the
  optimizer's backward hooks and SUM-reduced in place;
- main_param, exp_avg, exp_avg_sq (fp32): master weights and Adam moments of the range
  this rank owns (the whole bucket without ZeRO-1). For fp32 params the master weights
  are the param_buffer range itself; for bf16 params they are a separate fp32 copy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.parallel.axes import Axis
from engine.parallel.mesh import FoldedMesh
from engine.parallel.traffic import ring_all_reduce_bytes, ring_gather_bytes

from .buckets import BucketPlan
from .comm import all_gather_into, all_reduce_sum, reduce_scatter_sum


@dataclass(frozen=True)
class AdamRange:
    """Views of one contiguous range of a bucket that AdamW updates."""
    param: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    decay: bool


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class FlatBucket:
    def __init__(self, plan: BucketPlan, params: list[nn.Parameter]):
        self.plan = plan
        device = params[plan.slots[0].index].device
        self.param_buffer = torch.zeros(plan.padded_numel, dtype=plan.dtype, device=device)
        self.grad_buffer = torch.zeros(plan.padded_numel, dtype=torch.float32, device=device)
        self.params = [params[slot.index] for slot in plan.slots]
        self._adopt_params()
        owned = self.param_buffer[plan.shard_start:plan.shard_end]
        self.separate_main = plan.dtype != torch.float32
        self.main_param = owned.float() if self.separate_main else owned   # .float() copies bf16
        self.exp_avg = torch.zeros_like(self.main_param)
        self.exp_avg_sq = torch.zeros_like(self.main_param)
        self.adam_ranges = [self._adam_range(lo, hi, decay) for lo, hi, decay in plan.adam_ranges()]
        self.pending_work = None
        self.gather_work = None
        self._gathered_grad: torch.Tensor | None = None

    @torch.no_grad()
    def _adopt_params(self) -> None:
        """Moves each param's storage into param_buffer and gives it a main_grad view."""
        for slot, param in zip(self.plan.slots, self.params):
            span = slice(slot.offset, slot.offset + slot.numel)
            view = self.param_buffer[span].view_as(param)
            view.copy_(param.detach())
            param.data = view
            param.main_grad = self.grad_buffer[span].view_as(param)

    def _adam_range(self, lo: int, hi: int, decay: bool) -> AdamRange:
        s = self.plan.shard_start
        return AdamRange(self.main_param[lo - s:hi - s], self.grad_buffer[lo:hi],
                         self.exp_avg[lo - s:hi - s], self.exp_avg_sq[lo - s:hi - s], decay)

    def reduced_grad(self) -> torch.Tensor:
        """The range of the gradient this rank owns (valid after complete_reduce)."""
        return self.grad_buffer[self.plan.shard_start:self.plan.shard_end]

    def storage_moved(self) -> list[str]:
        """Names of params whose storage is no longer a view of param_buffer (e.g. the model
        was cast or moved after the optimizer was built)."""
        base, size = self.param_buffer.data_ptr(), self.param_buffer.element_size()
        return [slot.name for slot, p in zip(self.plan.slots, self.params)
                if slot.numel and p.data_ptr() != base + slot.offset * size]

    def scale_grad_(self, coef: torch.Tensor) -> None:
        self.reduced_grad().mul_(coef)
        self._gathered_grad = None

    def reset_grads(self) -> None:
        self.grad_buffer.zero_()
        self._gathered_grad = None

    def _run(self, op: str, axis: Axis, mesh: FoldedMesh, async_op: bool):
        group, size = mesh.group(axis), mesh.size(axis)
        if op == "reduce_scatter":
            mesh.traffic.add(axis, ring_gather_bytes(_nbytes(self.grad_buffer), size))
            return reduce_scatter_sum(self.reduced_grad(), self.grad_buffer, group, async_op)
        mesh.traffic.add(axis, ring_all_reduce_bytes(_nbytes(self.reduced_grad()), size))
        return all_reduce_sum(self.reduced_grad(), group, async_op)

    def launch_reduce(self, mesh: FoldedMesh) -> None:
        """Starts the first reduction asynchronously (the one over the shard / first axis)."""
        steps = self.plan.reduction_steps(mesh)
        if steps:
            self.pending_work = self._run(*steps[0], mesh, True)

    def complete_reduce(self, mesh: FoldedMesh) -> None:
        """Waits for the first reduction, then sums over the remaining axes (on the shard)."""
        if self.pending_work is not None:
            self.pending_work.wait()
            self.pending_work = None
        for op, axis in self.plan.reduction_steps(mesh)[1:]:
            self._run(op, axis, mesh, False)

    @torch.no_grad()
    def publish_params(self, mesh: FoldedMesh, async_op: bool = False) -> None:
        """Writes the updated master weights into the model params (cast, then ZeRO-1
        gather). async_op: the gather is only started; wait_params() completes it."""
        plan = self.plan
        owned = self.param_buffer[plan.shard_start:plan.shard_end]
        if self.separate_main:
            owned.copy_(self.main_param)
        if plan.shard_axis is not None and mesh.size(plan.shard_axis) > 1:
            mesh.traffic.add(plan.shard_axis,
                             ring_gather_bytes(_nbytes(self.param_buffer), mesh.size(plan.shard_axis)))
            self.gather_work = all_gather_into(self.param_buffer, owned, mesh.group(plan.shard_axis),
                                               async_op)

    def wait_params(self) -> None:
        """Completes a started parameter gather (a stream wait on CUDA, no host sync)."""
        if self.gather_work is not None:
            self.gather_work.wait()
            self.gather_work = None

    def full_grad(self, mesh: FoldedMesh) -> torch.Tensor:
        """The whole reduced gradient buffer. Under ZeRO-1 only the owned range is reduced
        locally, so this all-gathers it over the shard axis once per step (a collective:
        every rank of the shard group must ask for the same buckets in the same order)."""
        plan = self.plan
        if plan.shard_axis is None or mesh.size(plan.shard_axis) == 1:
            return self.grad_buffer
        if self._gathered_grad is None:
            self._gathered_grad = torch.empty_like(self.grad_buffer)
            all_gather_into(self._gathered_grad, self.reduced_grad(), mesh.group(plan.shard_axis))
        return self._gathered_grad
