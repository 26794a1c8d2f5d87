"""Model shapes: the MoE transformer family (Mixtral, Qwen2-MoE, DeepSeekMoE) and presets.

Real presets feed FLOPs/memory planning; only `tiny-moe` is instantiated on CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int = 8
    top_k: int = 2
    ffn_hidden_size: int = 128           # per routed expert
    num_shared_experts: int = 0
    shared_ffn_hidden_size: int = 0      # per shared expert
    shared_expert_gate: bool = False     # Qwen2-MoE: shared output scaled by sigmoid(g . x) per token
    score_func: str = "softmax"          # "softmax" | "sigmoid"
    pre_softmax: bool = False            # softmax over all experts before top-k (Mixtral: False)
    norm_topk_prob: bool = True          # renormalise the k selected probabilities
    aux_loss_type: str = "switch"        # "none" | "switch" | "seq"
    aux_loss_coeff: float = 1e-2
    z_loss_coeff: float = 0.0
    expert_bias: bool = False            # aux-loss-free balancing (bias used for selection only)
    bias_update_rate: float = 1e-3
    capacity_factor: float | None = None  # None = dropless
    drop_policy: str = "probs"           # "probs" | "position"
    pad_to_capacity: bool = False

    def __post_init__(self) -> None:
        if self.score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"moe.score_func={self.score_func!r}: expected softmax or sigmoid")
        if self.aux_loss_type not in ("none", "switch", "seq"):
            raise ValueError(f"moe.aux_loss_type={self.aux_loss_type!r}: expected none, switch or seq")
        if self.drop_policy not in ("probs", "position"):
            raise ValueError(f"moe.drop_policy={self.drop_policy!r}: expected probs or position")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"moe.top_k={self.top_k}: must be in [1, num_experts={self.num_experts}]")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"moe.capacity_factor={self.capacity_factor}: must be > 0 or null")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None          # default hidden_size // num_heads
    ffn_hidden_size: int = 128           # dense FFN layers
    first_k_dense: int = 1               # the first k layers use a dense FFN
    moe_layer_step: int = 1              # MoE only where (layer_id + 1) % step == 0 (HF decoder_sparse_step)
    dense_layers: tuple[int, ...] = ()   # further dense-FFN layers at any position (HF mlp_only_layers)
    moe: MoEConfig = field(default_factory=MoEConfig)
    qkv_bias: bool = False
    qk_norm: bool = False                # Qwen3: per-head RMSNorm of q and k before RoPE
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    max_seq_len: int = 4096

    def __post_init__(self) -> None:
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key}={getattr(self, key)}: must be >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_kv_heads={self.num_kv_heads}: must divide num_heads={self.num_heads}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size}: not divisible by num_heads={self.num_heads}; "
                "set model.head_dim")
        if not 0 <= self.first_k_dense <= self.num_layers:
            raise ValueError(f"model.first_k_dense={self.first_k_dense}: must be in [0, num_layers]")
        if self.moe_layer_step < 1:
            raise ValueError(f"model.moe_layer_step={self.moe_layer_step}: must be >= 1")
        object.__setattr__(self, "dense_layers", tuple(int(i) for i in self.dense_layers))
        bad = [i for i in self.dense_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"model.dense_layers={list(self.dense_layers)}: ids {bad} not in [0, num_layers)")

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def is_moe_layer(self, layer_id: int) -> bool:
        return (layer_id >= self.first_k_dense and layer_id not in self.dense_layers
                and (layer_id + 1) % self.moe_layer_step == 0)

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_layers))

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - self.num_moe_layers


PRESETS: dict[str, ModelConfig] = {
    # Runs a training step in well under a second on one CPU core.
    "tiny-moe": ModelConfig(
        vocab_size=512, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
        ffn_hidden_size=128, first_k_dense=1, max_seq_len=1024,
        moe=MoEConfig(num_experts=8, top_k=2, ffn_hidden_size=32,
                      num_shared_experts=1, shared_ffn_hidden_size=32)),
    # Mixtral 8x7B (Mistral AI model card).
    "mixtral-8x7b": ModelConfig(
        vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
        ffn_hidden_size=14336, first_k_dense=0, rope_theta=1e6, max_seq_len=32768,
        moe=MoEConfig(num_experts=8, top_k=2, ffn_hidden_size=14336)),
    # Mixtral 8x22B.
    "mixtral-8x22b": ModelConfig(
        vocab_size=32768, hidden_size=6144, num_layers=56, num_heads=48, num_kv_heads=8,
        ffn_hidden_size=16384, first_k_dense=0, rope_theta=1e6, max_seq_len=65536,
        moe=MoEConfig(num_experts=8, top_k=2, ffn_hidden_size=16384)),
    # Qwen2-57B-A14B: softmax over all 64 experts, top-8 without renormalisation, one shared expert.
    "qwen2-57b-a14b": ModelConfig(
        vocab_size=151936, hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
        ffn_hidden_size=18944, first_k_dense=0, qkv_bias=True, rope_theta=1e6, norm_eps=1e-6,
        max_seq_len=32768,
        moe=MoEConfig(num_experts=64, top_k=8, ffn_hidden_size=2560, num_shared_experts=1,
                      shared_ffn_hidden_size=20480, shared_expert_gate=True, pre_softmax=True,
                      norm_topk_prob=False)),
    # Qwen3-30B-A3B: 128 experts top-8 renormalised, per-head q/k RMSNorm, head_dim 128, no bias.
    "qwen3-30b-a3b": ModelConfig(
        vocab_size=151936, hidden_size=2048, num_layers=48, num_heads=32, num_kv_heads=4,
        head_dim=128, ffn_hidden_size=6144, first_k_dense=0, qk_norm=True, rope_theta=1e6,
        norm_eps=1e-6, max_seq_len=40960,
        moe=MoEConfig(num_experts=128, top_k=8, ffn_hidden_size=768, pre_softmax=True,
                      norm_topk_prob=True)),
    # DeepSeekMoE-16B style fine-grained experts: 64 routed top-6, 2 shared, first layer dense.
    "deepseek-moe-16b": ModelConfig(
        vocab_size=102400, hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=16,
        ffn_hidden_size=10944, first_k_dense=1, max_seq_len=4096,
        moe=MoEConfig(num_experts=64, top_k=6, ffn_hidden_size=1408, num_shared_experts=2,
                      shared_ffn_hidden_size=1408, pre_softmax=True, norm_topk_prob=False)),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """A preset with top-level or `moe_<field>` overrides (e.g. moe_num_experts=16)."""
    if name not in PRESETS:
        raise KeyError(f"model.preset={name!r}: unknown; known presets: {sorted(PRESETS)}")
    return with_overrides(PRESETS[name], **overrides)


def with_overrides(base: ModelConfig, **overrides) -> ModelConfig:
    """`base` with top-level or `moe_<field>` overrides."""
    moe_fields = {f.name for f in fields(MoEConfig)}
    moe_over = {k[4:]: v for k, v in overrides.items() if k.startswith("moe_") and k[4:] in moe_fields}
    top_over = {k: v for k, v in overrides.items() if not (k.startswith("moe_") and k[4:] in moe_fields)}
    unknown = set(top_over) - {f.name for f in fields(ModelConfig)}
    if unknown:
        raise KeyError(f"unknown model override(s) {sorted(unknown)}")
    moe = replace(base.moe, **moe_over) if moe_over else base.moe
    return replace(base, moe=moe, **top_over)


# The fields that decide which parameters exist and their shapes: a checkpoint loads into
# a model only when these agree (the others, e.g. loss coefficients, may change on resume).
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "ffn_hidden_size", "first_k_dense", "moe_layer_step", "dense_layers", "qkv_bias",
                "qk_norm", "tie_embeddings")
MOE_SHAPE_FIELDS = ("num_experts", "ffn_hidden_size", "num_shared_experts", "shared_ffn_hidden_size",
                    "shared_expert_gate", "expert_bias")


def shape_differences(saved: dict, current: ModelConfig) -> dict[str, tuple]:
    """{key: (saved, current)} for the shape fields in which a saved ModelConfig (as a dict,
    e.g. from checkpoint metadata) differs from `current`; keys absent from `saved` are skipped."""
    out = {}
    for key in SHAPE_FIELDS:
        if key in saved and _plain(saved[key]) != _plain(getattr(current, key)):
            out[key] = (saved[key], getattr(current, key))
    saved_moe = saved.get("moe") or {}
    for key in MOE_SHAPE_FIELDS:
        if key in saved_moe and _plain(saved_moe[key]) != _plain(getattr(current.moe, key)):
            out[f"moe.{key}"] = (saved_moe[key], getattr(current.moe, key))
    return out


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value
