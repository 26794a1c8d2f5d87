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
Clipping scales by min(1, max_norm / (norm + 1e-6)), as torch.nn.utils.clip_grad_norm_
does, with the coefficient a tensor on the model's device: the norm is never read to the
host here, so the update's kernels queue behind the backward instead of waiting for it (on
a GPU the optimizer's many small launches then overlap the backward's tail); the trainer
reads the norm with the step's other metrics. A coefficient of exactly 1 leaves every
gradient bit-identical, so skipping the multiply when no clipping is needed is not worth a
host read.

Precision at fp32 speed: a single fp32 norm of a large bucket is off by up to ~1e-4
relative on CPU (measured 1.7e-4 for 6e6 elements: the kernel accumulates each SIMD lane
sequentially), and bucketing differs by layout, so the clip coefficient would depend on
the layout. Each bucket is therefore reduced in fp32 over rows of NORM_CHUNK elements
(short sums, measured 1.3e-9 relative at 6e6) and only those few partials are squared
and summed in fp64: within 2x of torch.nn.utils.clip_grad_norm_, where an fp64 norm of
every element took 25x (benchmarks/clip.py).
"""
from __future__ import annotations

import torch

from engine.parallel.mesh import FoldedMesh

from .comm import all_reduce_sum
from .flat_bucket import FlatBucket

WORLD_AXES = ("stage", "pp")   # their product is the whole world
NORM_CHUNK = 4096              # elements per fp32 partial sum


def chunk_norms(flat: torch.Tensor) -> torch.Tensor:
    """fp32 [ceil(n / NORM_CHUNK)]: the 2-norm of every NORM_CHUNK-element run of `flat`."""
    body = flat.numel() - flat.numel() % NORM_CHUNK
    norms = [torch.linalg.vector_norm(flat[:body].view(-1, NORM_CHUNK), dim=1)]
    if body < flat.numel():
        norms.append(torch.linalg.vector_norm(flat[body:]).view(1))
    return torch.cat(norms)


def global_grad_norm(buckets: list[FlatBucket], mesh: FoldedMesh) -> torch.Tensor:
    """0-d fp64 on the buckets' device: the global norm, identical on every rank."""
    counted = [b.reduced_grad() for b in buckets if b.plan.counts_in_norm(mesh)]
    device = buckets[0].grad_buffer.device if buckets else torch.device("cpu")
    local = torch.zeros((), dtype=torch.float64, device=device)
    if counted:
        partials = torch.cat([chunk_norms(grad.float()) for grad in counted])
        local = partials.double().square().sum()
    for axis in WORLD_AXES:        # one SUM per axis group, on the device
        if mesh.size(axis) > 1:
            all_reduce_sum(local, mesh.group(axis))
    return local.sqrt()            # no host read: see the module docstring


@torch.no_grad()
def clip_(buckets: list[FlatBucket], total_norm: torch.Tensor, max_norm: float) -> None:
    """Scales the owned gradient of every bucket so its global norm is at most max_norm
    (no-op for max_norm <= 0). A non-finite norm gives 0 (inf) or NaN (nan) gradients, as
    torch's clip_grad_norm_ does without error_if_nonfinite."""
    if max_norm <= 0:
        return
    # fp64 like the Python-float arithmetic of torch's path, then the fp32 the kernel uses.
    coef = (max_norm / (total_norm.double() + 1e-6)).clamp(max=1.0).float()
    for bucket in buckets:
        bucket.scale_grad_(coef)
