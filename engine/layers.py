"""Parallelism-free building blocks: RMSNorm, RoPE, SwiGLU, GQA attention.

Linear layers are plain nn.Linear and the attention core is an injectable module, so
tensor and context parallelism swap them without the model knowing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.swiglu import swiglu


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 so bf16 runs keep the statistics exact enough.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [..., s, d/2] for integer positions (any order: CP shards are not contiguous)."""
    # Made on positions' device: a host tensor copied there would synchronise a CUDA stream.
    dims = torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device)
    inv_freq = 1.0 / theta ** (dims / head_dim)
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq
    return angles.cos().float(), angles.sin().float()


def apply_rope(x_bsnd: torch.Tensor, cos_bsd: torch.Tensor, sin_bsd: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) (RoFormer, arXiv 2104.09864)."""
    x = x_bsnd.float().unflatten(-1, (-1, 2))
    x_even, x_odd = x[..., 0], x[..., 1]
    cos, sin = cos_bsd.unsqueeze(-2), sin_bsd.unsqueeze(-2)   # broadcast over heads
    rotated = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return rotated.flatten(-2).to(x_bsnd.dtype)


class SDPAttention(nn.Module):
    """Default single-device attention core: causal softmax attention with GQA."""

    def forward(self, q_bsnd: torch.Tensor, k_bsnd: torch.Tensor, v_bsnd: torch.Tensor) -> torch.Tensor:
        out_bnsd = F.scaled_dot_product_attention(
            q_bsnd.transpose(1, 2), k_bsnd.transpose(1, 2), v_bsnd.transpose(1, 2),
            is_causal=True, enable_gqa=q_bsnd.shape[2] != k_bsnd.shape[2])
        return out_bnsd.transpose(1, 2)


class Attention(nn.Module):
    """GQA self-attention. Head counts are read from the projections' shapes at run time,
    so a column-parallel swap (local heads) needs no change here."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 rope_theta: float, qkv_bias: bool = False, qk_norm: bool = False,
                 norm_eps: float = 1e-6):
        super().__init__()
        self.head_dim = head_dim
        self.rope_theta = rope_theta
        self.wq = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.wk = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.wv = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.wo = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        # Qwen3: RMSNorm over each head's d channels of q and k, before RoPE.
        self.q_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.core: nn.Module = SDPAttention()

    def project_qkv(self, x_bsh: torch.Tensor, positions_bs: torch.Tensor):
        q = self.wq(x_bsh).unflatten(-1, (-1, self.head_dim))   # [b, s, n_q, d]
        k = self.wk(x_bsh).unflatten(-1, (-1, self.head_dim))   # [b, s, n_kv, d]
        v = self.wv(x_bsh).unflatten(-1, (-1, self.head_dim))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope_cos_sin(positions_bs, self.head_dim, self.rope_theta)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x_bsh: torch.Tensor, positions_bs: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project_qkv(x_bsh, positions_bs)
        return self.wo(self.core(q, k, v).flatten(-2))


class SwiGLU(nn.Module):
    """Dense FFN (and shared expert): down(silu(gate(x)) * up(x)) (Shazeer, arXiv 2002.05202)."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.w_gate = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.w_up = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.w_down = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(swiglu(self.w_gate(x), self.w_up(x)))
