"""Global gradient-norm clipping over the folded mesh.

Counting rule (every element of the model's full gradient exactly once):
- after reduction, a gradient value is identical on all ranks of its *replica axes*:
  its reduce axes, plus tp for a dense param that TP does not slice (buckets.replica_axes);
  only the rank at index 0 of each replica axis adds it to the local sum of squares;
- values that differ across ranks are shards and are all added: TP slices (tp),
  experts (etp x ep), pipeline stages (pp), and under ZeRO-1 the shards of the shard
  axis (dp_cp or edp), which is then dropped from the replica axes;
- the local sums are SUM-reduced over the whole world ("stage" then "pp" groups), so
  every rank gets the same norm.
Clipping scales by max_norm / (norm + 1e-6) when that is below 1, as
torch.nn.utils.clip_grad_norm_ does.
"""
from __future__ import annotations

import torch

from engine.parallel.mesh import FoldedMesh

from .comm import all_reduce_sum
from .flat_bucket import FlatBucket

WORLD_AXES = ("stage", "pp")   # their product is the whole world


def global_grad_norm(buckets: list[FlatBucket], mesh: FoldedMesh) -> float:
    counted = [b.reduced_grad() for b in buckets if b.plan.counts_in_norm(mesh)]
    device = buckets[0].grad_buffer.device if buckets else torch.device("cpu")
    # Accumulate in fp64: an fp32 norm of a large bucket is off by ~1e-5 relative on CPU
    # (measured 1.7e-5 for 3e5 elements), and bucketing differs by layout, so the clip
    # coefficient would depend on the layout.
    local = torch.zeros((), dtype=torch.float64, device=device)
    for grad in counted:
        local += torch.linalg.vector_norm(grad, dtype=torch.float64).square()
    for axis in WORLD_AXES:
        if mesh.size(axis) > 1:
            all_reduce_sum(local, mesh.group(axis))
    return float(local.sqrt())


@torch.no_grad()
def clip_(buckets: list[FlatBucket], total_norm: float, max_norm: float) -> bool:
    """Scales the owned gradient of every bucket so its global norm is at most max_norm;
    returns whether it scaled."""
    coef = max_norm / (total_norm + 1e-6)
    if max_norm <= 0 or coef >= 1.0:
        return False
    for bucket in buckets:
        bucket.scale_grad_(coef)
    return True
