"""Per-token LM loss for the trainer: vocab-parallel CE at tp > 1, plain CE at tp = 1."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.parallel.mesh import FoldedMesh

from .comm import TPComm
from .layers import vocab_parallel_cross_entropy

IGNORE_INDEX = -100


def tp_loss(logits_local: torch.Tensor, labels: torch.Tensor, mesh: FoldedMesh,
            comm: TPComm | None = None) -> torch.Tensor:
    """Per-token cross-entropy [b, s] in fp32, identical on the TP ranks (count it once).

    logits_local: [b, s, V/tp], this rank's contiguous vocab block (the column-parallel
    head's output); labels: [b, s] global token ids. The loss's all-reduces (3·b·s floats)
    count on the TP axis of the mesh's Traffic.
    """
    if mesh.size("tp") == 1:
        return F.cross_entropy(logits_local.float().flatten(0, 1), labels.flatten(),
                               reduction="none", ignore_index=IGNORE_INDEX).view_as(labels)
    comm = comm if comm is not None else TPComm(mesh.group("tp"), mesh.traffic)
    return vocab_parallel_cross_entropy(logits_local, labels, comm, IGNORE_INDEX)
