"""The one table between foldmoe parameter names and Hugging Face tensor names.

Each foldmoe tensor maps to one HF tensor, or (stacked experts) to one HF tensor per
expert. A `TensorMap` says how the HF values are laid out relative to foldmoe's:

- `transpose`: foldmoe stores the 2-D matrix transposed (experts: w_gate/w_up [E, h, F]
  against HF's per-expert [F, h]; w_down [E, F, h] against [h, F]);
- `rope_head_dim`: rows are per-head q/k channels; foldmoe rotates adjacent pairs
  (x[2i], x[2i+1]) (engine/layers.py) while HF rotates halves (x[i], x[i + d/2]), so
  foldmoe row 2i of a head is HF row i and row 2i+1 is HF row i + d/2. Scores q.k are a
  sum over channels, so permuting q's and k's channels the same way changes nothing else.

Only this module knows names; change it when a foldmoe module is renamed or fused.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# HF module holding the routed experts, per model_type.
_MOE_MODULE = {"mixtral": "block_sparse_moe", "qwen2_moe": "mlp", "qwen3_moe": "mlp"}
# (foldmoe expert param) -> (HF per-expert projection name) per model_type.
_EXPERT_PROJ = {
    "mixtral": {"w_gate": "w1", "w_up": "w3", "w_down": "w2"},
    "qwen2_moe": {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"},
    "qwen3_moe": {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"},
}
_SWIGLU = {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}
_ATTN = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
_FIXED = {"embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight",
          "norm.weight": "model.norm.weight"}


@dataclass(frozen=True)
class TensorMap:
    hf_name: str                      # for stacked experts: a template with "{expert}"
    stacked_experts: bool = False     # foldmoe dim 0 = expert id, one HF tensor per expert
    transpose: bool = False           # the (per-expert) 2-D matrix is stored transposed
    rope_head_dim: int | None = None  # dim 0 holds per-head q/k channels (see module doc)


def hf_tensor_map(name: str, model_type: str, head_dim: int) -> TensorMap | None:
    """The HF source of foldmoe tensor `name`; None for tensors HF does not have
    (the router's selection-only expert bias)."""
    if model_type not in _MOE_MODULE:
        raise ValueError(f"model_type {model_type!r}: supported are {sorted(_MOE_MODULE)}")
    if name in _FIXED:
        return TensorMap(_FIXED[name])
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if match is None:
        raise KeyError(f"{name}: no Hugging Face name known for it")
    layer, rest = match.groups()
    prefix = f"model.layers.{layer}"
    moe = f"{prefix}.{_MOE_MODULE[model_type]}"
    if rest == "attn_norm.weight":
        return TensorMap(f"{prefix}.input_layernorm.weight")
    if rest == "ffn_norm.weight":
        return TensorMap(f"{prefix}.post_attention_layernorm.weight")
    if m := re.fullmatch(r"attention\.(wq|wk|wv|wo)\.(weight|bias)", rest):
        rope = head_dim if m.group(1) in ("wq", "wk") else None
        return TensorMap(f"{prefix}.self_attn.{_ATTN[m.group(1)]}.{m.group(2)}", rope_head_dim=rope)
    if m := re.fullmatch(r"attention\.(q|k)_norm\.weight", rest):
        return TensorMap(f"{prefix}.self_attn.{m.group(1)}_norm.weight", rope_head_dim=head_dim)
    if m := re.fullmatch(r"ffn\.(w_gate|w_up|w_down)\.weight", rest):
        return TensorMap(f"{prefix}.mlp.{_SWIGLU[m.group(1)]}.weight")
    if rest == "ffn.router.weight":
        return TensorMap(f"{moe}.gate.weight")
    if rest == "ffn.router.expert_bias":
        return None
    if m := re.fullmatch(r"ffn\.experts\.(w_gate|w_up|w_down)", rest):
        proj = _EXPERT_PROJ[model_type][m.group(1)]
        return TensorMap(f"{moe}.experts.{{expert}}.{proj}.weight", stacked_experts=True, transpose=True)
    if m := re.fullmatch(r"ffn\.shared_experts\.(w_gate|w_up|w_down)\.weight", rest):
        return TensorMap(f"{moe}.shared_expert.{_SWIGLU[m.group(1)]}.weight")
    if rest == "ffn.shared_expert_gate.weight":
        return TensorMap(f"{moe}.shared_expert_gate.weight")
    raise KeyError(f"{name}: no Hugging Face name known for it")


def rope_rows_to_hf(rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """HF row index of each foldmoe q/k row index (same head, pairs -> halves)."""
    head, channel = rows // head_dim, rows % head_dim
    return head * head_dim + channel // 2 + (channel % 2) * (head_dim // 2)


def rope_rows_from_hf(hf_rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Inverse of rope_rows_to_hf."""
    head, channel = hf_rows // head_dim, hf_rows % head_dim
    half = head_dim // 2
    return head * head_dim + (channel % half) * 2 + channel // half
