"""Tensor + sequence parallelism (Megatron-style) for the foldmoe model."""
from .comm import (TPComm, copy_to_tp_region, gather_from_sequence_parallel, gather_from_tp_region,
                   reduce_from_tp_region, reduce_scatter_to_sequence_parallel,
                   scatter_to_sequence_parallel)
from .cross_entropy import vocab_parallel_cross_entropy
from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from .loss import tp_loss

__all__ = ["TPComm", "copy_to_tp_region", "reduce_from_tp_region", "gather_from_sequence_parallel",
           "reduce_scatter_to_sequence_parallel", "scatter_to_sequence_parallel",
           "gather_from_tp_region", "ColumnParallelLinear", "RowParallelLinear",
           "VocabParallelEmbedding", "vocab_parallel_cross_entropy", "tp_loss"]
