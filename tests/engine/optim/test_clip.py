"""Gradient-norm precision at fp32 speed (engine/optim/clip.py): fp32 partial sums over short
chunks, fp64 over the partials. A single fp32 norm of a bucket of this size is off by
~1e-5 relative on CPU; the chunked norm must stay within 1e-8 of the fp64 value, so that
the clip coefficient does not depend on how a layout cuts the gradients into buckets."""
import torch
from torch import nn

from engine.config.train import TrainConfig
from engine.optim import FoldedOptimizer
from engine.optim.clip import NORM_CHUNK, chunk_norms, clip_, global_grad_norm
from engine.parallel.config import ParallelConfig
from engine.parallel.mesh import FoldedMesh
from engine.testing.host_syncs import HostReadCounter


def _optimizer(sizes, bucket_bytes):
    params = [nn.Parameter(torch.zeros(n)) for n in sizes]
    mesh = FoldedMesh(ParallelConfig(world_size=1), rank=0, create_groups=False)
    opt = FoldedOptimizer([(f"p{i}.weight", p) for i, p in enumerate(params)], mesh, TrainConfig(),
                          bucket_bytes=bucket_bytes)
    gen = torch.Generator().manual_seed(0)
    for p in params:     # mean far from 0: many same-sign terms, the hard case for fp32
        p.main_grad.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    return opt, mesh


def _fp64_norm(opt) -> float:
    return float(torch.cat([b.reduced_grad().double() for b in opt.buckets]).norm())


def test_chunk_norms_cover_every_element_once():
    x = torch.randn(3 * NORM_CHUNK + 17, dtype=torch.float32)
    parts = chunk_norms(x)
    assert parts.shape == (4,) and parts.dtype == torch.float32
    torch.testing.assert_close(parts.double().square().sum().sqrt(), x.double().norm(), rtol=1e-7, atol=0)
    assert chunk_norms(x[:0]).numel() == 0 and chunk_norms(x[:5]).numel() == 1


def test_norm_matches_fp64_where_a_plain_fp32_norm_does_not():
    opt, mesh = _optimizer([1_500_000, 700_001, 3], bucket_bytes=64 * 2**20)
    exact = _fp64_norm(opt)
    plain_fp32 = float(torch.linalg.vector_norm(torch.cat([b.reduced_grad() for b in opt.buckets])))
    assert abs(plain_fp32 - exact) / exact > 1e-7          # the error this module exists to avoid
    assert abs(float(global_grad_norm(opt.buckets, mesh)) - exact) / exact < 1e-8


def test_norm_does_not_depend_on_bucketing():
    one, mesh = _optimizer([400_000, 300_000, 5], bucket_bytes=64 * 2**20)
    many, _ = _optimizer([400_000, 300_000, 5], bucket_bytes=4)        # one param per bucket
    assert len(one.buckets) == 1 and len(many.buckets) == 3
    a, b = float(global_grad_norm(one.buckets, mesh)), float(global_grad_norm(many.buckets, mesh))
    assert abs(a - b) / a < 1e-9


def test_norm_and_clipping_read_nothing_to_the_host():
    opt, mesh = _optimizer([10_000, 333], bucket_bytes=64 * 2**20)
    with HostReadCounter() as reads:
        norm = global_grad_norm(opt.buckets, mesh)
        clip_(opt.buckets, norm, 1.0)
    assert reads.count == 0, reads.sites                   # the trainer reads it with its metrics
    assert norm.dtype == torch.float64 and norm.shape == () and float(norm) > 1.0
    assert abs(float(global_grad_norm(opt.buckets, mesh)) - 1.0) < 1e-5


def test_coefficient_is_torchs_and_below_max_norm_nothing_changes():
    opt, mesh = _optimizer([10_000, 333], bucket_bytes=64 * 2**20)
    before = [b.reduced_grad().clone() for b in opt.buckets]
    norm = global_grad_norm(opt.buckets, mesh)
    clip_(opt.buckets, norm, 2.0 * float(norm))            # coefficient clamps to exactly 1
    assert all(torch.equal(a, b.reduced_grad()) for a, b in zip(before, opt.buckets))
    clip_(opt.buckets, norm, 0.5)                          # torch's Python-float coefficient, bit for bit
    coef = 0.5 / (float(norm) + 1e-6)
    assert all(torch.equal(a * coef, b.reduced_grad()) for a, b in zip(before, opt.buckets))


def test_non_finite_norm_behaves_as_torchs_clip():
    opt, mesh = _optimizer([100], bucket_bytes=64 * 2**20)
    clip_(opt.buckets, torch.tensor(float("inf"), dtype=torch.float64), 1.0)
    assert torch.equal(opt.buckets[0].reduced_grad(), torch.zeros(100))
    clip_(opt.buckets, torch.tensor(float("nan"), dtype=torch.float64), 1.0)
    assert opt.buckets[0].reduced_grad().isnan().all()
