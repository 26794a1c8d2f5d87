"""Optimizer: bucketed grad sync, ZeRO-1 AdamW, clipping, LR schedule."""
from .buckets import DEFAULT_BUCKET_BYTES, plan_buckets, replica_axes, uses_weight_decay
from .grad_sync import all_reduce_grads
from .optimizer import FoldedOptimizer
from .schedule import lr_at

__all__ = ["DEFAULT_BUCKET_BYTES", "FoldedOptimizer", "all_reduce_grads", "lr_at", "plan_buckets",
           "replica_axes", "uses_weight_decay"]
