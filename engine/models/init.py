"""Layout-independent initialisation, computed shard by shard.

The initial value of element i (flat index in the full, unsharded tensor) of parameter
`name` is a pure function of (seed, name, i): a counter-based generator (SplitMix64 of the
index, Box-Muller to a normal). A rank therefore computes exactly the values of the slice
it owns, from the slices the parallel plans recorded, and never generates or holds a full
tensor it does not own; every layout still trains the same global model.

Integer arithmetic is exact on every device; the float64 log/cos of Box-Muller may differ
in the last ulp between CPU and CUDA, which the cast to the parameter dtype hides in
almost all elements (parity tests run on one device).
"""
from __future__ import annotations

import math
import zlib
from typing import Sequence

import torch
from torch import nn

from engine.config.model import ModelConfig

_OUTPUT_PROJECTIONS = ("wo.weight", "w_down.weight", "experts.w_down")
_CHUNK_ELEMS = 1 << 16           # values generated at once: ~3 MB of int64/float64 temporaries

# SplitMix64 constants (Steele et al., "Fast splittable pseudorandom number generators"),
# written as the signed int64 values torch holds; int64 multiplication wraps mod 2**64.
def _int64(value: int) -> int:
    value %= 1 << 64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _int64(0x9E3779B97F4A7C15)
_TWO_GOLDEN = _int64(2 * 0x9E3779B97F4A7C15)   # two draws (u1, u2) per element
_MIX1 = _int64(0xBF58476D1CE4E5B9)
_MIX2 = _int64(0x94D049BB133111EB)


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def _unit_interval(bits: torch.Tensor) -> torch.Tensor:
    """The top 53 bits as a float64 in [0, 1)."""
    return _shift_right(bits, 11).to(torch.float64) * 2.0**-53


def normal_at(flat_index: torch.Tensor, key: int) -> torch.Tensor:
    """Standard normal values (float64) at int64 flat indices for stream `key`."""
    base = flat_index * _TWO_GOLDEN + key
    u1 = 1.0 - _unit_interval(_mix(base))            # (0, 1]: log is finite
    u2 = _unit_interval(_mix(base + _GOLDEN))
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


def stream_key(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 62)


def global_coords(full_shape: Sequence[int], slices: Sequence[tuple], device) -> list[torch.Tensor]:
    """Per dim, the global coordinate of each local position, from the recorded slices
    ((dim, start, length) or (dim, index tuple, None), applied in order)."""
    coords = [torch.arange(n, device=device) for n in full_shape]
    for dim, start, length in slices:
        if length is None:
            coords[dim] = coords[dim][torch.tensor(start, dtype=torch.long, device=device)]
        else:
            coords[dim] = coords[dim][start:start + length]
    return coords


def _flat_index(coords: list[torch.Tensor], strides: list[int], offset: int) -> torch.Tensor:
    """offset + sum_d coords[d] * strides[d], broadcast to the block's shape (int64)."""
    ndim = len(coords)
    flat = torch.full((), offset, dtype=torch.long, device=coords[0].device)
    for d, (c, stride) in enumerate(zip(coords, strides)):
        flat = flat + (c * stride).view([-1 if i == d else 1 for i in range(ndim)])
    return flat


def _fill_block_(out: torch.Tensor, coords: list[torch.Tensor], strides: list[int], offset: int,
                 key: int, std: float) -> None:
    """Fills `out` (whose dims map to `coords`) chunk by chunk: row blocks of dim 0 while a
    row fits in _CHUNK_ELEMS, else one row at a time, recursing into the row."""
    row = out[0].numel() if out.dim() > 1 else 1
    if out.dim() > 1 and row > _CHUNK_ELEMS:
        for r in range(out.shape[0]):
            _fill_block_(out[r], coords[1:], strides[1:], offset + int(coords[0][r]) * strides[0],
                         key, std)
        return
    rows = max(1, _CHUNK_ELEMS // row)
    for lo in range(0, out.shape[0], rows):
        part = [coords[0][lo:lo + rows], *coords[1:]]
        out[lo:lo + rows] = (normal_at(_flat_index(part, strides, offset), key) * std).to(out.dtype)


def init_rule(name: str, cfg: ModelConfig) -> tuple[str, float]:
    """("ones" | "zeros" | "normal", std) for parameter or buffer `name`."""
    if name.endswith("norm.weight"):
        return "ones", 0.0
    if name.endswith(".bias") or name.endswith("expert_bias"):
        return "zeros", 0.0
    std = cfg.init_std
    if name.endswith(_OUTPUT_PROJECTIONS):
        std = std / math.sqrt(2 * cfg.num_layers)   # GPT-2 style residual scaling
    return "normal", std


@torch.no_grad()
def fill_shard_(out: torch.Tensor, name: str, full_shape: Sequence[int], slices: Sequence[tuple],
                cfg: ModelConfig, seed: int) -> torch.Tensor:
    """Writes the initial values of this rank's slice of `name` into `out` (any dtype and
    device), generating at most _CHUNK_ELEMS values at a time."""
    kind, std = init_rule(name, cfg)
    if kind != "normal":
        return out.fill_(1.0 if kind == "ones" else 0.0)
    if out.numel() == 0:
        return out
    coords = global_coords(full_shape, slices, out.device)
    key = stream_key(seed, name)
    if out.dim() == 0:
        return out.copy_(normal_at(torch.zeros((), dtype=torch.long, device=out.device), key) * std)
    strides = [math.prod(full_shape[d + 1:]) for d in range(len(full_shape))]
    _fill_block_(out, coords, strides, 0, key, std)
    return out


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig, seed: int) -> None:
    """Initialises an unsharded model in place (every parameter at its full shape)."""
    for name, param in model.named_parameters():
        fill_shard_(param, name, param.shape, (), cfg, seed)
