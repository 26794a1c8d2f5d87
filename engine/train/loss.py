"""Language-model loss: the SUM of per-token cross-entropy over this rank's tokens.

The caller divides by the global token count. Under TP the logits are vocab-sharded and
the vocab-parallel CE never gathers them; the result is replicated on the TP ranks.
"""
from __future__ import annotations

import torch

from engine.parallel.mesh import FoldedMesh
from engine.tensor_parallel.loss import tp_loss


def lm_loss_fn(logits_bsv: torch.Tensor, labels_bs: torch.Tensor, mesh: FoldedMesh,
               tp_comm=None) -> torch.Tensor:
    return tp_loss(logits_bsv, labels_bs, mesh, comm=tp_comm).sum()
