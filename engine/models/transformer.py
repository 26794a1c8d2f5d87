"""Decoder-only MoE transformer (Mixtral / Qwen2-MoE / DeepSeekMoE family).

The model holds no parallelism. A pipeline stage is the same class built with a subset
of layer ids; parameter names use global layer ids so they are stable across layouts.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine.config.model import ModelConfig
from engine.layers import Attention, RMSNorm, SwiGLU
from engine.moe.layer import MoELayer

RECOMPUTE_MODES = ("none", "selective", "full", "remat_aware")


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.recompute = "none"
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attention = Attention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.dim_head,
                                   cfg.rope_theta, cfg.qkv_bias, qk_norm=cfg.qk_norm,
                                   norm_eps=cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        if cfg.is_moe_layer(layer_id):
            self.ffn: nn.Module = MoELayer(cfg.hidden_size, cfg.moe)
        else:
            self.ffn = SwiGLU(cfg.hidden_size, cfg.ffn_hidden_size)

    def _pre_attention(self, x_bsh, positions_bs):
        return self.attention.project_qkv(self.attn_norm(x_bsh), positions_bs)

    def _post_attention(self, attn_bsnd, x_bsh):
        h_bsh = x_bsh + self.attention.wo(attn_bsnd.flatten(-2))
        return h_bsh + self.ffn(self.ffn_norm(h_bsh))

    def _core(self, q, k, v):
        return self.attention.core(q, k, v)

    def forward(self, x_bsh: torch.Tensor, positions_bs: torch.Tensor) -> torch.Tensor:
        mode = self.recompute if self.training and torch.is_grad_enabled() else "none"
        if mode == "full":
            return checkpoint(self._forward_plain, x_bsh, positions_bs, use_reentrant=False)
        if mode == "remat_aware":
            # LightSeq (arXiv 2310.03294 sec. 3.3): segments end at attention; the attention
            # core keeps (q, k, v, out, lse) itself, so backward never re-runs it or its ring.
            q, k, v = checkpoint(self._pre_attention, x_bsh, positions_bs, use_reentrant=False)
            attn = self._core(q, k, v)
            return checkpoint(self._post_attention, attn, x_bsh, use_reentrant=False)
        return self._forward_plain(x_bsh, positions_bs)

    def _forward_plain(self, x_bsh, positions_bs):
        q, k, v = self._pre_attention(x_bsh, positions_bs)
        if self.recompute == "selective" and self.training:
            # Megatron-style selective recompute: only the core attention is re-run.
            attn = checkpoint(self._core, q, k, v, use_reentrant=False)
        else:
            attn = self._core(q, k, v)
        return self._post_attention(attn, x_bsh)


class MoETransformer(nn.Module):
    """`layer_ids` selects the layers of this pipeline chunk; the first chunk owns the
    embedding, the last the final norm and head (and a tied embedding copy if tied)."""

    def __init__(self, cfg: ModelConfig, layer_ids: Iterable[int] | None = None,
                 first_stage: bool = True, last_stage: bool = True):
        super().__init__()
        self.cfg = cfg
        layer_ids = range(cfg.num_layers) if layer_ids is None else list(layer_ids)
        self.first_stage, self.last_stage = first_stage, last_stage
        needs_embed = first_stage or (last_stage and cfg.tie_embeddings)
        # from_pretrained skips nn.Embedding's normal_ init: values come from engine.models.init,
        # and normal_ on the meta device would import torch._dynamo (~2 s, ~150 MB per process).
        self.embed = (nn.Embedding.from_pretrained(torch.empty(cfg.vocab_size, cfg.hidden_size), freeze=False)
                      if needs_embed else None)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, i) for i in layer_ids})
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps) if last_stage else None
        self.head = None
        if last_stage and not cfg.tie_embeddings:
            self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def borrowed_params(self) -> list[nn.Parameter]:
        """Params that this module's own forward reads from a submodule without calling
        it: the tied head's embedding table (hooks on the embedding never see that use)."""
        return [self.embed.weight] if self.last_stage and self.head is None else []

    def forward(self, inputs: torch.Tensor, positions_bs: torch.Tensor) -> torch.Tensor:
        """inputs: token ids [b, s] on the first stage, hidden [b, s, h] elsewhere.
        Returns logits [b, s, V] on the last stage, hidden [b, s, h] otherwise."""
        x_bsh = self.embed(inputs) if self.first_stage else inputs
        for layer in self.layers.values():
            x_bsh = layer(x_bsh, positions_bs)
        if not self.last_stage:
            return x_bsh
        x_bsh = self.norm(x_bsh)
        if self.head is not None:
            return self.head(x_bsh)
        return F.linear(x_bsh, self.embed.weight)

    def moe_layers(self) -> list[MoELayer]:
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    def set_recompute(self, mode: str) -> None:
        if mode not in RECOMPUTE_MODES:
            raise ValueError(f"train.recompute={mode!r}: expected one of {RECOMPUTE_MODES}")
        for layer in self.layers.values():
            layer.recompute = mode


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Total and active (per-token) parameter counts from the shapes alone."""
    h, d = cfg.hidden_size, cfg.dim_head
    attn = h * d * (cfg.num_heads * 2 + cfg.num_kv_heads * 2)
    if cfg.qkv_bias:
        attn += d * (cfg.num_heads + 2 * cfg.num_kv_heads)
    dense_ffn = 3 * h * cfg.ffn_hidden_size
    moe = cfg.moe
    expert = 3 * h * moe.ffn_hidden_size
    shared = 3 * h * moe.shared_ffn_hidden_size * moe.num_shared_experts
    router = h * moe.num_experts + (h if moe.shared_expert_gate and moe.num_shared_experts else 0)
    norms = 2 * h + (2 * d if cfg.qk_norm else 0)
    embed = cfg.vocab_size * h * (1 if cfg.tie_embeddings else 2)
    n_dense, n_moe = cfg.num_dense_layers, cfg.num_moe_layers
    common = embed + h + cfg.num_layers * (attn + norms) + n_dense * dense_ffn + n_moe * (router + shared)
    return {"total": common + n_moe * moe.num_experts * expert,
            "active": common + n_moe * moe.top_k * expert}
