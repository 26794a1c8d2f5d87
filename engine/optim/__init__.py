from .buckets import DEFAULT_BUCKET_BYTES, plan_buckets, replica_axes, uses_weight_decay
from .optimizer import FoldedOptimizer
from .schedule import lr_at

__all__ = ["DEFAULT_BUCKET_BYTES", "FoldedOptimizer", "lr_at", "plan_buckets", "replica_axes",
           "uses_weight_decay"]
