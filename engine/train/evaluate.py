"""Forward-only token loss of a rank's model chunks (a Trainer's, or the optimizer-free
ModelShards of `foldmoe eval`, engine/train/model_shards.py), in their own layout.

Each evaluation batch is a global batch [B, s+1] like a training step's (B =
train.global_batch_size) with a target weight per token (engine/data/eval_data.py). It is
split into this rank's micro-batches by the training step's `split_microbatches` (the
weights with the same rows and zigzag positions), and run through the same chunks: one
forward per micro-batch at pp = 1, and at pp > 1 the training pipeline schedule with every
backward action and exchange removed (`forward_program`; its pairing and freedom from
deadlock are checked by engine.pipeline.verify like the training schedules). No parallelism
lives here: TP/SP, CP, EP/ETP and PP are the chunks' and the executor's.

Reduction: the weighted CE sum (fp64) of this rank's targets is counted once per TP group
(the vocab-parallel CE is replicated over tp), summed over the stage (dp x cp; every other
rank of a stage contributes 0) and over pp (0 off the last stage). The target count is
the weights' sum, known to every rank from the global batch. Mean = sum / count.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist

from engine.data.eval_data import EvalBatch
from engine.moe.tracking import moe_layers
from engine.parallel.axes import Axis
from engine.pipeline.executor import PipelineExecutor
from engine.pipeline.schedules import Action, build_schedule
from engine.pipeline.verify import check_pairing, simulate
from engine.tensor_parallel.loss import tp_loss
from engine.train.batch import split_microbatches
from engine.train.pipeline_setup import activation_shape

FORWARD_KINDS = ("F", "SEND_F", "RECV_F")


def forward_program(schedule: str, pp: int, m: int, vpp: int, rank: int) -> list[Action]:
    """This PP rank's forward-only program: the training schedule without its backwards."""
    programs = [[a for a in program if a.kind in FORWARD_KINDS]
                for program in build_schedule(schedule, pp, m, vpp)]
    check_pairing(programs)
    simulate(programs)      # raises on deadlock
    return programs[rank]


def eval_due(train, completed_steps: int) -> bool:
    """val_loss after every train.eval_every steps and after the last step."""
    every = train.eval_every
    return every > 0 and (completed_steps % every == 0 or completed_steps == train.steps)


class Evaluator:
    """Mean token loss of `model`'s chunks over EvalBatches (see the module docstring);
    `model`: a Trainer or a ModelShards."""

    def __init__(self, model):
        self.model = model
        self._executor: PipelineExecutor | None = None

    def _weighted_ce(self, logits: torch.Tensor, microbatch: dict) -> torch.Tensor:
        per_token = tp_loss(logits, microbatch["labels"], self.model.mesh,
                            comm=self.model.chunks[-1].tp_comm)
        return (per_token.double() * microbatch["weights"]).sum()

    def _pipeline(self) -> PipelineExecutor:
        if self._executor is None:
            t = self.model
            cfg = t.mesh.config
            program = forward_program(t.train_cfg.pipeline_schedule, cfg.pp, t.num_microbatches,
                                      cfg.vpp, t.mesh.pp_rank)
            dtype = torch.bfloat16 if t.train_cfg.precision == "bf16" else torch.float32
            self._executor = PipelineExecutor(t.chunks, t.mesh, program, self._weighted_ce,
                                              activation_shape(t), dtype, t.device)
        return self._executor

    def _local_sum(self, batch: EvalBatch) -> torch.Tensor:
        t = self.model
        split = (t.mesh, t.train_cfg.micro_batch_size, t.num_microbatches, t.device)
        inputs = split_microbatches(batch.tokens, *split)
        weights = split_microbatches(batch.weights, *split)
        microbatches = [{**mb.as_dict(), "weights": w.labels} for mb, w in zip(inputs, weights)]
        total = torch.zeros((), dtype=torch.float64, device=t.device)
        if t.mesh.config.pp > 1:
            losses = self._pipeline().run(microbatches)
            return sum((l for l in losses if l is not None), total)
        (chunk,) = t.chunks
        for mb in microbatches:
            total = total + self._weighted_ce(chunk(mb["inputs"], mb["positions"]), mb)
        return total

    @torch.no_grad()
    def loss_sum(self, batches: Iterable[EvalBatch]) -> tuple[float, int]:
        """(sum of per-token CE over every counted target, number of targets), global."""
        t, mesh = self.model, self.model.mesh
        for chunk in t.chunks:
            chunk.eval()
        try:
            local = torch.zeros((), dtype=torch.float64, device=t.device)
            targets = 0
            for batch in batches:
                local = local + self._local_sum(batch)
                targets += batch.num_targets
        finally:
            # Routing records of these forwards are not the next step's statistics (no
            # reduction was started for them under no_grad: dropping them is safe).
            for layer in moe_layers(t.chunks):
                layer.reset_stats()
            for chunk in t.chunks:
                chunk.train()
        value = local if mesh.rank_in(Axis.TP) == 0 else torch.zeros_like(local)
        for axis in (Axis.STAGE, Axis.PP):
            if mesh.size(axis) > 1:
                dist.all_reduce(value, group=mesh.group(axis))
        return float(value.item()), targets

    def mean_loss(self, batches: Iterable[EvalBatch]) -> float:
        total, targets = self.loss_sum(batches)
        return total / targets if targets else math.nan
