"""Language-model loss: the SUM of per-token cross-entropy over this rank's tokens.

The caller divides by the global token count. Under TP the logits are vocab-sharded and
the vocab-parallel CE never gathers them; the result is replicated on the TP ranks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.parallel.mesh import FoldedMesh


def lm_loss_fn(logits_bsv: torch.Tensor, labels_bs: torch.Tensor, mesh: FoldedMesh) -> torch.Tensor:
    if mesh.config.tp > 1:
        from engine.tensor_parallel.loss import tp_loss
        return tp_loss(logits_bsv, labels_bs, mesh).sum()
    return F.cross_entropy(logits_bsv.float().flatten(0, 1), labels_bs.flatten(), reduction="sum")
