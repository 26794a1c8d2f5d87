"""Layout-independent initialisation.

Each parameter is drawn from its own generator seeded by (seed, parameter name), at its
full (unsharded) shape. Parallel layouts shard after this, so a shard is exactly the
slice of the single-process parameter, whatever the layout.
"""
from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from .config import ModelConfig

_OUTPUT_PROJECTIONS = ("wo.weight", "w_down.weight", "experts.w_down")


def param_generator(seed: int, name: str) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1))
    return gen


def init_value(name: str, shape: torch.Size, cfg: ModelConfig, seed: int) -> torch.Tensor:
    """The full-shape initial value of parameter `name` (fp32, CPU)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(".bias") or name.endswith("expert_bias"):
        return torch.zeros(shape)
    std = cfg.init_std
    if name.endswith(_OUTPUT_PROJECTIONS):
        std = std / math.sqrt(2 * cfg.num_layers)   # GPT-2 style residual scaling
    return torch.randn(shape, generator=param_generator(seed, name)) * std


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig, seed: int) -> None:
    """Initialise an unsharded model (call before parallelising it)."""
    for name, param in model.named_parameters():
        param.copy_(init_value(name, param.shape, cfg, seed))
