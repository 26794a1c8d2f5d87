"""FoldedOptimizer: fp32 gradient accumulation, bucketed (optionally overlapped) SUM
reduction over each param's mesh axes, global-norm clipping, and AdamW with optional
ZeRO-1 sharding of master weights and moments (Rajbhandari et al. arXiv 1910.02054).

Per step, driven by the trainer:
  prepare_for_backward(n) -> n x (forward, backward) -> finish_grad_sync()
  -> clip_grad_norm(max_norm) -> step(step)
With train.overlap_param_gather (ZeRO-1), step() only starts the params' all-gathers; the
forward pre-hooks of install_forward_waits complete each bucket's before its first use,
and wait_params() completes them all for anything else that touches the params.
Backward hooks add each param's grad into its fp32 `main_grad` (a view of the bucket's
grad buffer) and free `p.grad`. With overlap_grad_reduce, a bucket's first reduction is
started asynchronously as soon as all its params have received their last micro-batch's
gradient. Buckets are launched strictly in bucket order on every rank, because ranks
must issue collectives on a group in the same order (and NCCL can deadlock when
communicators are used in different orders). Build the optimizer after the model has its
final dtype and device: the params become views of the optimizer's flat buffers.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.config.train import TrainConfig
from engine.parallel.mesh import FoldedMesh

from .adamw import chunked_adamw_
from .buckets import DEFAULT_BUCKET_BYTES, plan_buckets
from .clip import clip_, global_grad_norm
from .flat_bucket import FlatBucket
from .schedule import lr_at
from .state import load_optimizer_state, optimizer_state


class FoldedOptimizer:
    def __init__(self, named_params: list[tuple[str, nn.Parameter]], mesh: FoldedMesh,
                 train_cfg: TrainConfig, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        self.mesh, self.cfg = mesh, train_cfg
        self.names = [name for name, _ in named_params]
        self.params = [param for _, param in named_params]
        plans = plan_buckets(named_params, mesh, zero1=train_cfg.zero1, bucket_bytes=bucket_bytes)
        self.buckets = [FlatBucket(plan, self.params) for plan in plans]
        self._bucket_of = {slot.index: b for b, plan in enumerate(plans) for slot in plan.slots}
        self._slot_of = {slot.index: slot for plan in plans for slot in plan.slots}
        self._index_of = {id(param): i for i, param in enumerate(self.params)}
        for i in self._bucket_of:
            self.params[i].register_post_accumulate_grad_hook(self._grad_hook(i))
        self.adam_step = 0
        # Parameter gathers are started in the order the forward first uses their buckets
        # (the lowest param index: registration follows the forward), the same on every rank.
        self._gather_order = sorted(range(len(plans)), key=lambda b: min(s.index for s in plans[b].slots))
        self._gathers_pending = False
        self.launched_in_backward = 0           # buckets whose reduction started in backward
        self._num_microbatches: int | None = None
        self._synced = False
        self._reset_step_counters()

    # ---- backward: fp32 accumulation and overlapped reduction -------------------------
    def _reset_step_counters(self) -> None:
        self._grad_counts = [0] * len(self.params)
        self._missing = [len(b.plan.slots) for b in self.buckets]
        self._next_launch = 0

    def _grad_hook(self, index: int):
        def hook(param: nn.Parameter) -> None:
            self._accumulate(index, param)
        return hook

    @torch.no_grad()
    def _accumulate(self, index: int, param: nn.Parameter) -> None:
        param.main_grad.add_(param.grad)     # fp32 += model-dtype grad
        param.grad = None
        if self._num_microbatches is None:
            return
        self._grad_counts[index] += 1
        count = self._grad_counts[index]
        if count > self._num_microbatches:
            raise RuntimeError(
                f"{self.names[index]} got gradient #{count} in a step of {self._num_microbatches} "
                "micro-batches: call prepare_for_backward(num_microbatches) before each step")
        if count == self._num_microbatches:
            bucket = self._bucket_of[index]
            self._missing[bucket] -= 1
            if self.cfg.overlap_grad_reduce and self._missing[bucket] == 0:
                self._launch_ready_buckets()

    def _launch_ready_buckets(self) -> None:
        """Launches the complete buckets at the head of the launch order."""
        while self._next_launch < len(self.buckets) and self._missing[self._next_launch] == 0:
            self.buckets[self._next_launch].launch_reduce(self.mesh)
            self._next_launch += 1
            self.launched_in_backward += 1

    def prepare_for_backward(self, num_microbatches: int) -> None:
        """Zeroes the fp32 accumulators; call before the first micro-batch of each step."""
        if num_microbatches < 1:
            raise ValueError(f"num_microbatches={num_microbatches}: must be >= 1")
        if any(b.pending_work is not None for b in self.buckets):
            raise RuntimeError("finish_grad_sync() was not called after the previous backward")
        for bucket in self.buckets:
            bucket.reset_grads()
        self._num_microbatches = num_microbatches
        self._synced = False
        self.launched_in_backward = 0
        self._reset_step_counters()

    def finish_grad_sync(self) -> None:
        """Launches the remaining buckets (all of them without overlap) and waits for every
        reduction (their bytes go to the mesh's Traffic, per axis)."""
        for bucket in self.buckets[self._next_launch:]:
            bucket.launch_reduce(self.mesh)
        self._next_launch = len(self.buckets)
        for bucket in self.buckets:
            bucket.complete_reduce(self.mesh)
        self._synced = True

    def synced_grad(self, param: nn.Parameter) -> torch.Tensor:
        """The reduced fp32 gradient of `param`, shaped like it (for tests and debugging;
        under ZeRO-1 a collective, see FlatBucket.full_grad)."""
        self._require_synced("synced_grad")
        index = self._index_of[id(param)]
        slot = self._slot_of[index]
        flat = self.buckets[self._bucket_of[index]].full_grad(self.mesh)[slot.offset:slot.offset + slot.numel]
        return flat.view_as(param)

    # ---- clipping and update -----------------------------------------------------------
    def _require_synced(self, what: str) -> None:
        if not self._synced:
            raise RuntimeError(f"{what}() needs finish_grad_sync() first in this step")

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Global grad norm (rule in engine/optim/clip.py); clips when max_norm > 0.
        Returns the norm before clipping, identical on every rank, as a 0-d fp64 tensor on
        the model's device: reading it is the caller's host synchronisation."""
        self._require_synced("clip_grad_norm")
        norm = global_grad_norm(self.buckets, self.mesh)
        clip_(self.buckets, norm, max_norm)
        return norm

    @torch.no_grad()
    def step(self, step: int) -> float:
        """AdamW on the owned ranges with lr = lr_at(step), then publishes the params
        (bf16 cast, ZeRO-1 all-gather). Returns the lr used."""
        self._require_synced("step")
        moved = [name for b in self.buckets for name in b.storage_moved()]
        if moved:
            raise RuntimeError(f"params {moved[:3]} no longer live in the optimizer's buffers: "
                               "cast/move the model before building FoldedOptimizer")
        lr = lr_at(step, self.cfg)
        self.adam_step += 1
        self.wait_params()     # a param no forward used still has last step's gather pending
        for decay in (True, False):
            self._adamw([r for b in self.buckets for r in b.adam_ranges if r.decay == decay],
                        lr, self.cfg.weight_decay if decay else 0.0)
        overlap = self.cfg.overlap_param_gather
        for b in self._gather_order:
            self.buckets[b].publish_params(self.mesh, async_op=overlap)
        self._gathers_pending = overlap
        self._synced = False
        return lr

    # ---- overlapped parameter gather (train.overlap_param_gather) ----------------------
    def wait_params(self) -> None:
        """Completes every started parameter gather; anything that reads or writes the
        params outside a forward (checkpoints, loading) calls this first."""
        if self._gathers_pending:
            for bucket in self.buckets:
                bucket.wait_params()
            self._gathers_pending = False

    def install_forward_waits(self, modules: list[nn.Module],
                              borrowed: dict[nn.Module, list[nn.Parameter]] | None = None) -> None:
        """A forward pre-hook on every module that holds params of this optimizer: it waits
        for the gathers of their buckets, so each bucket's all-gather runs behind the
        forward of the layers before it (Megatron's overlap_param_gather). `borrowed`: per
        module, params its forward reads from a submodule without calling it (a tied
        head's embedding table), waited for before that module's forward."""
        for root in modules:
            for module in root.modules():
                params = list(module.parameters(recurse=False)) + list((borrowed or {}).get(module, []))
                buckets = sorted({self._bucket_of[self._index_of[id(p)]]
                                  for p in params if id(p) in self._index_of})
                if buckets:
                    module.register_forward_pre_hook(self._forward_wait(buckets))

    def _forward_wait(self, buckets: list[int]):
        def hook(module, args) -> None:
            if self._gathers_pending:
                for b in buckets:
                    self.buckets[b].wait_params()
        return hook

    def _adamw(self, ranges, lr: float, weight_decay: float) -> None:
        # Bit-identical to torch's per-tensor AdamW, in cache-sized chunks (engine/optim/adamw.py).
        chunked_adamw_([r.param for r in ranges], [r.grad for r in ranges], [r.exp_avg for r in ranges],
                       [r.exp_avg_sq for r in ranges], step=self.adam_step, lr=lr, beta1=self.cfg.beta1,
                       beta2=self.cfg.beta2, eps=self.cfg.eps, weight_decay=weight_decay)

    # ---- checkpoint -------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's optimizer state (format in engine/optim/state.py)."""
        self.wait_params()
        return optimizer_state(self.buckets, self.adam_step, self.cfg.zero1)

    def load_state_dict(self, state: dict) -> None:
        """Restores a state saved with the same layout; raises ValueError otherwise. Model
        params are restored separately (fp32 params are their own master weights)."""
        self.wait_params()
        self.adam_step = load_optimizer_state(self.buckets, state, self.cfg.zero1)
