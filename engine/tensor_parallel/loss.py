"""Per-token LM loss for the trainer and eval: the chunked (vocab-parallel at tp > 1)
cross-entropy of engine/tensor_parallel/cross_entropy.py."""
from __future__ import annotations

import torch

from engine.parallel.mesh import FoldedMesh

from .comm import TPComm
from .cross_entropy import vocab_parallel_cross_entropy

IGNORE_INDEX = -100


def tp_loss(logits_local: torch.Tensor, labels: torch.Tensor, mesh: FoldedMesh,
            comm: TPComm | None = None) -> torch.Tensor:
    """Per-token cross-entropy [b, s] in fp32, identical on the TP ranks (count it once).

    logits_local: [b, s, V/tp], this rank's contiguous vocab block (the column-parallel
    head's output); labels: [b, s] global token ids. The loss's all-reduces (3·b·s floats)
    count on the TP axis of the mesh's Traffic.
    """
    if mesh.size("tp") == 1:
        comm = None                      # the whole vocabulary is here: no all-reduces
    elif comm is None:
        comm = TPComm(mesh.group("tp"), mesh.traffic)
    return vocab_parallel_cross_entropy(logits_local, labels, comm, IGNORE_INDEX)
