"""The engine-level training step: micro-batches -> forward/backward -> grad sync ->
clip -> AdamW. Runs under the test harness, torchrun and the Ray worker alike.

Loss normalisation: each rank's LM loss is its local CE sum divided by the number of
tokens in the whole global batch, so every gradient reduction is a SUM (see
engine/parallel/param_attrs.py) and any layout equals one process.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from engine.config.model import ModelConfig
from engine.config.train import TrainConfig
from engine.metrics.flops import model_flops_per_iteration
from engine.metrics.memory import param_bytes
from engine.moe.tracking import (finalize_routing_stats, layer_imbalance_tensors, moe_stats_tensors,
                                 set_aux_loss_scale, update_expert_biases)
from engine.optim import FoldedOptimizer
from engine.parallel.axes import Axis
from engine.parallel.mesh import FoldedMesh
from engine.parallel.traffic import by_kind
from engine.train.batch import local_rows, split_microbatches
from engine.train.model_shards import named_parameters
from engine.train.loss import lm_loss_fn
from engine.train.phase_clock import PhaseClock
from engine.train.phases import PhaseListener, phase_axes
from engine.train.pipeline_setup import build_executor
from engine.train.state import checkpoint_state, load_checkpoint_state


class Trainer:
    """Steps this rank's model chunks (built and parallelized by engine.compose). The layout
    is the mesh's: `mesh.config` is the one ParallelConfig of the run."""

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: FoldedMesh,
                 chunks: list[nn.Module], *, device: torch.device | None = None,
                 build_peak_bytes: int | None = None):
        self.model_cfg, self.train_cfg, self.mesh = model_cfg, train_cfg, mesh
        self.build_peak_bytes = build_peak_bytes      # this rank's peak while building the chunks
        self.param_bytes = param_bytes(chunks)        # bytes of the parameters this rank holds
        self.device = device or torch.device("cpu")
        self.num_microbatches = train_cfg.num_microbatches(mesh.config.dp)
        self.chunks = list(chunks)
        self.named_params = named_parameters(self.chunks)
        self.optimizer = FoldedOptimizer(self.named_params, mesh, train_cfg)
        self.global_tokens = train_cfg.global_batch_size * train_cfg.seq_len
        self.model_flops = model_flops_per_iteration(
            model_cfg, train_cfg.global_batch_size, train_cfg.seq_len)
        self.completed_steps = 0
        # The data's position, saved with checkpoints (engine/data/position.py): the caller's.
        self.data_state: dict = {}
        self.clock = PhaseClock(self.device)
        # Told of every phase change (the worker's heartbeat): a call, never a host sync.
        self.phase_listener: PhaseListener | None = None
        self._phase_axes = phase_axes(mesh.config)
        if train_cfg.overlap_param_gather:
            self.optimizer.install_forward_waits(
                self.chunks, borrowed={chunk: chunk.borrowed_params() for chunk in self.chunks})
        self.executor = None
        if mesh.config.pp > 1:
            self.executor = build_executor(self)
        for chunk in self.chunks:   # aux losses are per global micro-batch: average them
            set_aux_loss_scale(chunk, 1.0 / self.num_microbatches)

    def _enter(self, phase: str) -> None:
        if self.phase_listener is not None:
            self.phase_listener(phase, self._phase_axes[phase])

    def loss_fn(self, logits: torch.Tensor, microbatch: dict) -> torch.Tensor:
        tp_comm = self.chunks[-1].tp_comm
        return lm_loss_fn(logits, microbatch["labels"], self.mesh, tp_comm) / self.global_tokens

    def _forward_backward(self, microbatches) -> torch.Tensor:
        """Sum over micro-batches of this rank's normalised LM loss (0 off the last stage)."""
        if self.executor is not None:
            self._enter("forward_backward")      # interleaved by the pipeline schedule
            losses = self.executor.run([mb.as_dict() for mb in microbatches])
            return sum((l.float() for l in losses if l is not None), self._zero_loss())
        (chunk,) = self.chunks
        total = self._zero_loss()
        for mb in microbatches:
            self._enter("forward")
            logits = chunk(mb.inputs, mb.positions)
            loss = self.loss_fn(logits, mb.as_dict())
            self._enter("backward")
            loss.backward()
            total += loss.detach().float()    # on the device: no host read per micro-batch
        return total

    def _zero_loss(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float32, device=self.device)

    def train_step(self, step: int, global_tokens: torch.Tensor,
                   stop_requested: Callable[[], bool] | None = None) -> dict[str, float]:
        """One optimizer step on the whole global batch of `step` (same tensor on all ranks).

        stop_requested: this rank's vote to stop, read when the metrics are reduced; metrics
        "stop_votes" is > 0 on every rank iff any rank voted (it rides in the metric vector:
        no extra collective; the count is the most votes of one pipeline stage)."""
        start = time.perf_counter()
        self.clock.start()
        self._enter("data")
        for chunk in self.chunks:
            chunk.train()
        microbatches = split_microbatches(global_tokens, self.mesh, self.train_cfg.micro_batch_size,
                                          self.num_microbatches, self.device)
        traffic_before = self.mesh.traffic.snapshot()
        self.clock.mark("data")
        self.optimizer.prepare_for_backward(self.num_microbatches)
        lm_loss = self._forward_backward(microbatches)
        self.clock.mark("forward_backward")
        self._enter("grad_sync")
        self.sync_grads()   # the part of the reduction backward did not hide
        self.clock.mark("grad_sync")
        self._enter("optimizer")
        grad_norm = self.optimizer.clip_grad_norm(self.train_cfg.grad_clip)
        lr = self.optimizer.step(step)
        update_expert_biases(self.chunks)
        self.clock.mark("optimizer")
        self._enter("metrics")
        metrics = self._step_metrics(lm_loss, grad_norm, lr, bool(stop_requested and stop_requested()))
        metrics.update(by_kind(self.mesh.traffic.since(traffic_before)))
        self.clock.mark("metrics")
        metrics["step_time_s"] = time.perf_counter() - start
        metrics.update({f"time_{phase}_s": s for phase, s in self.clock.seconds().items()})
        self.completed_steps = step + 1
        return metrics

    def local_batch_rows(self) -> list[int]:
        """The global batch rows train_step reads on this rank (engine/train/batch.py)."""
        return local_rows(self.mesh, self.train_cfg.micro_batch_size, self.num_microbatches)

    def sync_grads(self) -> None:
        """Completes the gradient reductions of the step (overlapped ones started in backward)."""
        self.optimizer.finish_grad_sync()

    def _moe_loss_terms(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """This stage's aux and z loss as they enter the objective (coefficient x sum over
        layers) and its routing statistics, all 0-d tensors on the model's device."""
        stats = moe_stats_tensors(self.chunks)
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        n_layers = sum(len(chunk.moe_layers()) for chunk in self.chunks)
        moe = self.model_cfg.moe
        aux_coeff = 0.0 if moe.aux_loss_type == "none" else moe.aux_loss_coeff
        aux = aux_coeff * stats.get("aux_loss", zero) * n_layers
        return aux, moe.z_loss_coeff * stats.get("z_loss", zero) * n_layers, stats

    def _step_metrics(self, lm_loss: torch.Tensor, grad_norm: torch.Tensor, lr: float,
                      stop_vote: bool = False) -> dict[str, float]:
        """Global step metrics from one vector on the model's device: one SUM over the stage
        and one all-gather over pp (each skipped at size 1), then the step's one host read
        (the grad norm rides in it too: identical on every rank, counted once per stage)."""
        finalize_routing_stats(self.chunks)
        moe_ids = [i for i in range(self.model_cfg.num_layers) if self.model_cfg.is_moe_layer(i)]
        by_layer = layer_imbalance_tensors(self.chunks)   # before _moe_loss_terms resets them
        aux, z, stats = self._moe_loss_terms()
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        # Each MoE layer lives on one stage and reads 0 on the others: the MAX over pp below
        # gathers the per-layer imbalance with the load statistics.
        # Dropped tokens go as counts, summed over pp with the losses: a fraction per stage
        # taken as the max over pp read the worst stage's, not the model's.
        local = torch.stack([lm_loss.to(self.device, torch.float64), aux.to(torch.float64),
                             z.to(torch.float64), stats.get("routed_assignments", zero).to(torch.float64),
                             stats.get("kept_assignments", zero).to(torch.float64),
                             stats.get("load_imbalance_max", zero), grad_norm.to(self.device),
                             *(by_layer.get(i, zero) for i in moe_ids),
                             zero + stop_vote]).to(torch.float64)
        # The LM loss is replicated over tp (counted by tp rank 0), the MoE terms over the whole
        # stage (counted by stage rank 0), so the stage SUM gives the sum over dp x cp and
        # the stage's MoE values; stages hold different layers: sum (max for the load
        # statistics, and for the grad norm that every stage holds alike) over pp, 0 off
        # the last stage for the LM loss.
        mesh = self.mesh
        counted = torch.full(local.shape, mesh.rank_in(Axis.STAGE) == 0, dtype=torch.bool,
                             device=self.device)   # filled on the device: no host copy
        counted[0].fill_(mesh.rank_in(Axis.TP) == 0)
        counted[-1].fill_(True)                     # every rank's own stop vote
        values = torch.where(counted, local, zero)
        if mesh.size(Axis.STAGE) > 1:
            dist.all_reduce(values, group=mesh.group(Axis.STAGE))
        if mesh.size(Axis.PP) > 1:
            per_stage = values.new_empty(mesh.size(Axis.PP) * values.numel())
            dist.all_gather_into_tensor(per_stage, values, group=mesh.group(Axis.PP))
            per_stage = per_stage.view(mesh.size(Axis.PP), -1)
            values = torch.cat([per_stage[:, :5].sum(0), per_stage[:, 5:].amax(0)])
        lm, aux, z, routed, kept, imbalance, norm, *layers, stop_votes = values.tolist()
        dropped = 1.0 - kept / routed if routed > 0 else 0.0
        return {"loss": lm + aux + z, "lm_loss": lm, "aux_loss": aux, "z_loss": z,
                "grad_norm": norm, "lr": float(lr), "tokens": float(self.global_tokens),
                "dropped_token_fraction": dropped, "load_imbalance": imbalance,
                "load_imbalance_by_layer": dict(zip(moe_ids, layers)),
                "model_flops": float(self.model_flops), "stop_votes": stop_votes}

    def checkpoint_state(self) -> dict:
        return checkpoint_state(self)

    def load_checkpoint_state(self, state: dict) -> None:
        load_checkpoint_state(self, state)
