"""Single-process tests of the optimizer's pure logic: LR schedule, weight-decay rule,
bucket layout and ZeRO-1 shard ranges, the grad-norm counting rule, AdamW parity with
torch.optim.AdamW, state_dict validation and misuse errors."""
import math

import pytest
import torch
from torch import nn

from engine.optim import FoldedOptimizer, lr_at, plan_buckets, uses_weight_decay
from engine.optim.buckets import ALIGN_ELEMS
from engine.parallel.config import ParallelConfig
from engine.parallel.mesh import FoldedMesh
from engine.parallel.param_attrs import mark_expert, mark_tp_sharded, set_reduce_axes
from engine.config.train import TrainConfig


def _mesh(world=1, rank=0, **kw):
    return FoldedMesh(ParallelConfig(world_size=world, **kw), rank=rank, create_groups=False)


# ---- LR schedule ---------------------------------------------------------------------------
@pytest.mark.parametrize("decay, expected", [
    # lr=1, min_lr=0.1, warmup 2, steps 10: warmup (s+1)/2, then decay over steps 2..10
    ("cosine", {0: 0.5, 1: 1.0, 2: 1.0, 4: 0.1 + 0.45 * (1 + math.cos(math.pi / 4)), 6: 0.55,
                10: 0.1, 25: 0.1}),
    ("linear", {0: 0.5, 1: 1.0, 2: 1.0, 4: 0.775, 6: 0.55, 10: 0.1, 25: 0.1}),
    ("constant", {0: 0.5, 1: 1.0, 2: 1.0, 6: 1.0, 25: 1.0}),
])
def test_lr_schedule_hand_values(decay, expected):
    cfg = TrainConfig(steps=10, lr=1.0, min_lr=0.1, warmup_steps=2, lr_decay=decay)
    for step, lr in expected.items():
        assert lr_at(step, cfg) == pytest.approx(lr, abs=1e-12), (decay, step)


def test_lr_schedule_without_warmup_starts_at_peak():
    cfg = TrainConfig(steps=4, lr=2.0, min_lr=0.0, warmup_steps=0, lr_decay="linear")
    assert [lr_at(s, cfg) for s in range(5)] == [2.0, 1.5, 1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="step=-1"):
        lr_at(-1, cfg)


# ---- weight decay and bucket layout --------------------------------------------------------
def test_weight_decay_rule():
    p = lambda *shape: nn.Parameter(torch.zeros(*shape))   # noqa: E731
    assert uses_weight_decay("layers.0.attention.wq.weight", p(4, 4))
    assert uses_weight_decay("layers.1.ffn.experts.w_gate", p(2, 4, 8))   # expert stack
    assert uses_weight_decay("embed.weight", p(10, 4))
    assert not uses_weight_decay("layers.0.attn_norm.weight", p(4))
    assert not uses_weight_decay("layers.0.attention.wq.bias", p(4))
    assert not uses_weight_decay("norm.weight", p(4))
    assert not uses_weight_decay("layers.0.ffn.router.scale", p(4))       # any 1-D param
    assert not uses_weight_decay("odd_norm.weight", p(4, 4))               # norm by name


def _tagged_params(tp=1):
    """(name, param) with every tag kind; registration order = forward order."""
    named = [("embed.weight", nn.Parameter(torch.zeros(8, 4))),
             ("attn_norm.weight", nn.Parameter(torch.ones(4))),
             ("wq.weight", nn.Parameter(torch.zeros(4, 4))),
             ("experts.w_up", nn.Parameter(torch.zeros(2, 4, 3))),
             ("head.weight", nn.Parameter(torch.zeros(5, 4)))]
    set_reduce_axes(named[1][1], ("dp_cp", "tp") if tp > 1 else ("dp_cp",))
    mark_tp_sharded(named[2][1], 0)
    mark_expert(named[3][1])
    return named


def test_buckets_group_by_tags_in_backward_order_with_decayed_params_first():
    named = _tagged_params()
    named.insert(2, ("attn_norm.bias", nn.Parameter(torch.zeros(4))))   # same tags as norm
    plans = plan_buckets(named, _mesh(), zero1=False, bucket_bytes=2**20)
    names = [[s.name for s in plan.slots] for plan in plans]
    # dense replicated params (tp = 1: norms included) share one bucket, launched first
    # because head.weight (last in forward) gets its gradient first; decayed params lead
    assert names == [["head.weight", "embed.weight", "attn_norm.bias", "attn_norm.weight"],
                     ["experts.w_up"], ["wq.weight"]]
    assert plans[0].reduce_axes == ("dp_cp",) and plans[1].reduce_axes == ("edp",)
    assert [s.offset for s in plans[0].slots] == [0, 20, 52, 56] and plans[0].padded_numel == 60
    assert plans[0].adam_ranges() == [(0, 52, True), (52, 60, False)]
    assert plans[0].replica_axes == ("dp_cp", "tp") and plans[2].replica_axes == ("dp_cp",)


def test_bucket_size_cuts_buckets():
    named = [(f"l{i}.weight", nn.Parameter(torch.zeros(4, 4))) for i in range(5)]
    plans = plan_buckets(named, _mesh(), zero1=False, bucket_bytes=2 * 16 * 4)   # two params
    assert [[s.name for s in p.slots] for p in plans] == [
        ["l4.weight", "l3.weight"], ["l2.weight", "l1.weight"], ["l0.weight"]]


def test_zero1_shards_tile_the_padded_bucket():
    world = 4
    named = _tagged_params(tp=2)
    by_rank = [plan_buckets(named, _mesh(world, r, tp=2, ep=2), zero1=True, bucket_bytes=2**20)
               for r in range(world)]
    for b, plan in enumerate(by_rank[0]):
        assert plan.padded_numel % (2 * ALIGN_ELEMS) == 0 and plan.padded_numel >= plan.used_numel
        shard_axis = plan.reduce_axes[0]
        assert plan.shard_axis == shard_axis in ("dp_cp", "edp")
        # ranks with the same index on the shard axis own the same range; the ranges of one
        # shard group tile [0, padded)
        mesh0 = _mesh(world, 0, tp=2, ep=2)
        group = mesh0.ranks(shard_axis)
        ranges = sorted((by_rank[r][b].shard_start, by_rank[r][b].shard_end) for r in group)
        assert ranges[0][0] == 0 and ranges[-1][1] == plan.padded_numel
        assert all(a[1] == b_[0] for a, b_ in zip(ranges, ranges[1:]))
    norm_plan = next(p for p in by_rank[0] if p.slots[0].name == "attn_norm.weight")
    assert norm_plan.reduction_steps(_mesh(world, 0, tp=2, ep=2)) == [
        ("reduce_scatter", "dp_cp"), ("all_reduce", "tp")]


@pytest.mark.parametrize("zero1", [False, True])
def test_grad_norm_counts_every_distinct_value_once(zero1):
    """tp2 ep2 on 4 ranks: how many ranks add each param's (shard of the) gradient."""
    world, kw = 4, dict(tp=2, ep=2)
    named = _tagged_params(tp=2)
    counters = {}
    for rank in range(world):
        mesh = _mesh(world, rank, **kw)
        for plan in plan_buckets(named, mesh, zero1=zero1, bucket_bytes=2**20):
            if plan.counts_in_norm(mesh):
                for slot in plan.slots:
                    counters.setdefault(slot.name, []).append(rank)
    mesh = _mesh(world, 0, **kw)
    assert mesh.ranks("tp") == [0, 1] and mesh.ranks("dp") == [0, 2] and mesh.ranks("edp") == [0, 2]
    if not zero1:
        # replicated and sequence-parallel: one rank; TP slices: one per tp rank; experts:
        # one per ep rank (edp replicas counted once)
        assert counters == {"embed.weight": [0], "head.weight": [0], "attn_norm.weight": [0],
                            "wq.weight": [0, 1], "experts.w_up": [0, 1]}
    else:
        # ZeRO-1: the dp_cp / edp shards are distinct and all counted, tp copies once
        assert counters == {"embed.weight": [0, 2], "head.weight": [0, 2], "attn_norm.weight": [0, 2],
                            "wq.weight": [0, 1, 2, 3], "experts.w_up": [0, 1, 2, 3]}


# ---- the optimizer on one process ----------------------------------------------------------
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3))


def _data(step):
    return torch.randn(4, 5, generator=torch.Generator().manual_seed(step))


@pytest.mark.parametrize("zero1", [False, True])
@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_one_process_equals_torch_adamw(zero1, clip):
    """Bit-exact without clipping; with clipping our norm sums per bucket and torch's per
    tensor, so the clip coefficient may differ by an ulp (measured <= 3e-8 on params)."""
    cfg = TrainConfig(steps=4, lr=1e-2, min_lr=1e-3, warmup_steps=1, grad_clip=clip, zero1=zero1)
    model, ref_model = _mlp(), _mlp()
    opt = FoldedOptimizer(list(model.named_parameters()), _mesh(), cfg, bucket_bytes=64)
    groups = {True: [], False: []}
    for name, p in ref_model.named_parameters():
        groups[uses_weight_decay(name, p)].append(p)
    ref = torch.optim.AdamW([{"params": groups[True]}, {"params": groups[False], "weight_decay": 0.0}],
                            lr=1.0, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    norms = []
    for step in range(cfg.steps):
        opt.prepare_for_backward(1)
        model(_data(step)).square().sum().backward()
        assert all(p.grad is None for p in model.parameters())
        opt.finish_grad_sync()
        norms.append(float(opt.clip_grad_norm(cfg.grad_clip)))
        opt.step(step)
        ref_model(_data(step)).square().sum().backward()
        ref_norm = torch.nn.utils.get_total_norm([p.grad for p in ref_model.parameters()])
        assert norms[-1] == pytest.approx(float(ref_norm), rel=1e-6)   # per-bucket vs per-tensor order
        if clip > 0:
            torch.nn.utils.clip_grads_with_norm_(ref_model.parameters(), clip, ref_norm)
        for group in ref.param_groups:
            group["lr"] = lr_at(step, cfg)
        ref.step()
        ref.zero_grad()
    assert max(norms) > 0.5, "the clipped case must clip"
    for p, q in zip(model.parameters(), ref_model.parameters()):
        if clip == 0:
            assert torch.equal(p, q)
        else:
            torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


def test_load_state_dict_rejects_another_layout():
    cfg = TrainConfig(zero1=True)
    opts = [FoldedOptimizer(list(_mlp().named_parameters()), _mesh(2, rank), cfg) for rank in (0, 1)]
    state = opts[0].state_dict()
    with pytest.raises(ValueError, match="does not match this layout"):
        opts[1].load_state_dict(state)              # rank 1 owns other params' state
    with pytest.raises(ValueError, match=r"range/2.weight=\[0, 20, 21\]"):
        opts[0].load_state_dict({**state, "range/2.weight": [0, 20, 21]})
    plain = FoldedOptimizer(list(_mlp().named_parameters()), _mesh(), TrainConfig())
    with pytest.raises(ValueError, match="zero1"):
        plain.load_state_dict(state)
    partial = {k: v for k, v in plain.state_dict().items() if not k.endswith("/0.weight")}
    with pytest.raises(ValueError, match="missing"):
        plain.load_state_dict(partial)


def test_misuse_is_reported():
    model = _mlp()
    opt = FoldedOptimizer(list(model.named_parameters()), _mesh(), TrainConfig())
    with pytest.raises(RuntimeError, match="finish_grad_sync"):
        opt.step(0)
    opt.prepare_for_backward(1)
    model(_data(0)).sum().backward()
    with pytest.raises(RuntimeError, match="prepare_for_backward"):
        model(_data(1)).sum().backward()            # a second micro-batch in a 1-micro-batch step
    opt.finish_grad_sync()
    model.to(torch.float64)                         # re-allocates the params behind the optimizer
    with pytest.raises(RuntimeError, match="before building FoldedOptimizer"):
        opt.step(0)
