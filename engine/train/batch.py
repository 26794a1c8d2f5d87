"""From the global batch of a step to this rank's micro-batches.

Every rank receives the same global batch [B, s+1] (data order is a function of
(seed, step) only). Micro-batch m of DP rank d takes sequences
[(m*dp + d)*mbs, (m*dp + d + 1)*mbs): the m-th *global* micro-batch is then the same
contiguous set of sequences for any dp with the same dp*mbs, which keeps the MoE
statistics (computed per global micro-batch) layout-independent.
Under CP each rank keeps its zigzag chunks (r and 2cp-1-r) with their true positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.context_parallel.zigzag import zigzag_indices
from engine.parallel.mesh import FoldedMesh


@dataclass
class MicroBatch:
    inputs: torch.Tensor      # [mbs, s_local] token ids
    labels: torch.Tensor      # [mbs, s_local]
    positions: torch.Tensor   # [mbs, s_local] global positions (RoPE)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"inputs": self.inputs, "labels": self.labels, "positions": self.positions}


def local_rows(mesh: FoldedMesh, micro_batch_size: int, num_microbatches: int) -> list[int]:
    """The rows of the global batch that split_microbatches reads on this rank (its DP
    rank's micro-batches, in order): a data loader need fetch only these."""
    dp, dp_rank = mesh.config.dp, mesh.rank_in("dp")
    return [(m * dp + dp_rank) * micro_batch_size + i
            for m in range(num_microbatches) for i in range(micro_batch_size)]


def split_microbatches(global_tokens: torch.Tensor, mesh: FoldedMesh, micro_batch_size: int,
                       num_microbatches: int, device: torch.device) -> list[MicroBatch]:
    dp, dp_rank = mesh.config.dp, mesh.rank_in("dp")
    expected = dp * micro_batch_size * num_microbatches
    if global_tokens.dim() != 2 or global_tokens.shape[0] != expected:
        raise ValueError(
            f"global batch has shape {tuple(global_tokens.shape)}; expected [{expected}, seq_len + 1]")
    seq_len = global_tokens.shape[1] - 1
    cp = mesh.config.cp
    positions = zigzag_indices(seq_len, cp, mesh.rank_in("cp")) if cp > 1 else torch.arange(seq_len)
    out = []
    for m in range(num_microbatches):
        start = (m * dp + dp_rank) * micro_batch_size
        rows = global_tokens[start:start + micro_batch_size]
        out.append(MicroBatch(
            inputs=rows[:, :-1][:, positions].to(device),
            labels=rows[:, 1:][:, positions].to(device),
            positions=positions.expand(micro_batch_size, -1).to(device)))
    return out
