"""Grouped SwiGLU experts.

Parameters are stacked per expert: w_gate/w_up [E, h, F], w_down [E, F, h]. Under
expert parallelism a rank holds a contiguous block of E/ep experts, and under expert
tensor parallelism a slice F/etp of the FFN dim (column-parallel gate/up, row-parallel
down), so its output is a partial sum that the dispatcher reduce-scatters over ETP.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def grouped_swiglu(x_nh: torch.Tensor, counts: list[int], w_gate_ehf: torch.Tensor,
                   w_up_ehf: torch.Tensor, w_down_efh: torch.Tensor) -> torch.Tensor:
    """SwiGLU of each contiguous token group with its expert's weights.

    x_nh is sorted by local expert, counts[e] rows for expert e. Zero-count experts still
    run (on an empty slice) so their weights always get a (zero) gradient: every rank
    then has the same set of grads to reduce, whatever it received. Kept a plain
    function so a fused grouped GEMM can replace it.
    """
    outputs = []
    for e, x_ch in enumerate(torch.split(x_nh, counts, dim=0)):
        hidden_cf = F.silu(x_ch @ w_gate_ehf[e]) * (x_ch @ w_up_ehf[e])
        outputs.append(hidden_cf @ w_down_efh[e])
    return torch.cat(outputs, dim=0)


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
        self.w_up = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
        self.w_down = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))
        for w in (self.w_gate, self.w_up, self.w_down):
            nn.init.normal_(w, std=0.02)

    @property
    def num_local_experts(self) -> int:
        return self.w_gate.shape[0]

    def forward(self, x_nh: torch.Tensor, counts: list[int]) -> torch.Tensor:
        if len(counts) != self.num_local_experts:
            raise ValueError(f"got counts for {len(counts)} experts, hold {self.num_local_experts}")
        return grouped_swiglu(x_nh, counts, self.w_gate, self.w_up, self.w_down)
