"""This rank's model chunks in a layout, without an optimizer: what forward-only work needs.

`foldmoe eval` holds only the parameters (model dtype) and buffers. A Trainer would also
allocate the fp32 gradient buffer (4 bytes per local parameter), the fp32 master copy and
both Adam moments (12 bytes per owned parameter), and read them from the checkpoint: at
bf16 that is at least 3x the memory and the bytes read of the weights alone, so a
checkpoint trained on many GPUs can be evaluated on fewer. A Trainer exposes the same
attributes, so engine.train.evaluate.Evaluator takes either.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.config.model import ModelConfig
from engine.config.train import TrainConfig
from engine.parallel.mesh import FoldedMesh


def named_parameters(chunks: list[nn.Module]) -> list[tuple[str, nn.Parameter]]:
    """Parameters of all chunks; names are global so they never collide."""
    out, seen = [], set()
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if name in seen:
                raise ValueError(f"parameter name {name!r} appears in two pipeline chunks")
            seen.add(name)
            out.append((name, param))
    return out


@dataclass
class ModelShards:
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    mesh: FoldedMesh
    chunks: list[nn.Module]
    device: torch.device
    build_peak_bytes: int | None = None   # this rank's peak while building the chunks
    completed_steps: int = 0              # the step of the checkpoint loaded, if any

    @property
    def num_microbatches(self) -> int:
        return self.train_cfg.num_microbatches(self.mesh.config.dp)

    @property
    def named_params(self) -> list[tuple[str, nn.Parameter]]:
        return named_parameters(self.chunks)
