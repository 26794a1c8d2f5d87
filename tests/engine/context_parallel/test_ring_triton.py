"""The Triton block kernels inside ring attention (merged-LSE backward), run on CPU by Triton's interpreter.

The backend registry only offers "triton" for CUDA tensors; under TRITON_INTERPRET=1 the same kernels
run on CPU tensors, so the worker opens the registry to CPU for this check. The variable must be set
before triton is imported, hence inside the freshly spawned ranks.
"""
import importlib.util
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from engine.testing.multiprocess import run_distributed

# find_spec, not import: the spawned ranks import this module and must import triton only after
# setting TRITON_INTERPRET.
HAS_TRITON = importlib.util.find_spec("triton") is not None
FP32_TOL = 1e-6  # fp32 kernels, fp32 merge; measured worst ~8.8e-7 vs the float64 reference


def _triton_ring_worker(rank, world):
    os.environ["TRITON_INTERPRET"] = "1"
    from engine.attention import backends, triton_backend
    from engine.context_parallel import ContextParallelAttention, zigzag_shard

    backends._DEVICE_TYPE["triton"] = "cpu"
    triton_backend.is_available = lambda: True
    errors = {}
    for causal in (True, False):
        gen = torch.Generator().manual_seed(0)
        q, dout = (torch.randn(1, 64, 4, 16, generator=gen) for _ in range(2))  # 2 tiles of 16 per block
        k, v = (torch.randn(1, 64, 2, 16, generator=gen) for _ in range(2))
        full = [t.double().requires_grad_() for t in (q, k, v)]
        ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in full), is_causal=causal,
                                             enable_gqa=True).transpose(1, 2)
        refs = (ref,) + torch.autograd.grad(ref, full, dout.double())
        local = [zigzag_shard(t, world, rank).requires_grad_() for t in (q, k, v)]
        core = ContextParallelAttention(dist.group.WORLD, list(range(world)), "ring", 1, "triton", causal=causal)
        out = core(*local)
        out.backward(zigzag_shard(dout, world, rank))
        got = [out] + [t.grad for t in local]
        errors[causal] = max(((x.double() - zigzag_shard(r, world, rank)).abs().max() / r.abs().max()).item()
                             for x, r in zip(got, refs))
    return errors


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (it is a Linux dependency of foldmoe)")
def test_ring_with_triton_blocks_matches_full_attention():
    for rank, errors in enumerate(run_distributed(_triton_ring_worker, 2, timeout_s=300)):
        assert max(errors.values()) <= FP32_TOL, (rank, errors)
