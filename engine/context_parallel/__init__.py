"""Context parallelism: zigzag sharding, ring (LightSeq), Ulysses all-to-all and hybrid attention."""
from .groups import CpSubGroups, split_cp_group
from .module import ContextParallelAttention, build_cp_attention
from .ring import RingAttentionFunction, RingSpec, merge_partials, step_plan
from .zigzag import zigzag_indices, zigzag_shard, zigzag_unshard

__all__ = [
    "ContextParallelAttention", "build_cp_attention", "CpSubGroups", "split_cp_group",
    "RingAttentionFunction", "RingSpec", "merge_partials", "step_plan",
    "zigzag_indices", "zigzag_shard", "zigzag_unshard",
]
