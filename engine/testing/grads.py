"""The production gradient reduction for modules tested outside the Trainer.

Layer-level parity tests (a sharded MoE layer, a TP model) need their gradients reduced
exactly as training reduces them. `TrainingGradSync` runs FoldedOptimizer's own buckets
and collectives; build it after the parallel plans have tagged the params and before the
forward, then call `finish()` after the backward: every `param.grad` is then the reduced
fp32 gradient, so tests read `.grad` as they would after a plain backward.
"""
from __future__ import annotations

from torch import nn

from engine.config.train import TrainConfig
from engine.optim import FoldedOptimizer
from engine.parallel.mesh import FoldedMesh


class TrainingGradSync:
    def __init__(self, named_params: list[tuple[str, nn.Parameter]], mesh: FoldedMesh,
                 train_cfg: TrainConfig | None = None):
        self.named_params = list(named_params)
        self.optimizer = FoldedOptimizer(self.named_params, mesh, train_cfg or TrainConfig())
        self.optimizer.prepare_for_backward(1)

    def finish(self) -> None:
        """Completes the reductions and writes each reduced gradient into `param.grad`."""
        self.optimizer.finish_grad_sync()
        for _, param in self.named_params:
            param.grad = self.optimizer.synced_grad(param).detach().clone().to(param.dtype)
