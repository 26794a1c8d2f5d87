"""The memory model against the real Trainer on gloo ranks (CPU, fp32 and bf16).

Measured (engine/testing/memory_probe.py): params, grads and optimizer state are the bytes
of the optimizer's real buffers; activations are the peak bytes of the storages created
during one training step and alive at once (forward, backward and optimizer step).
Bounds: params + grads + optimizer within 5% (the model ignores only ZeRO-1 padding to
64-element shards); total within 15% (issue 10 asked for 25%; the measured residuals, in
docs/performance.md, are at most 3.5% on the total and 8.1% on the activations; the margin
is for gloo's worker thread, which frees a collective's tensors a moment late: one run in
about 15 failed a 10% bound).
"""
from __future__ import annotations

import pytest

from engine.config.model import get_preset
from engine.parallel.config import ParallelConfig
from engine.planner.memory import estimate_memory
from engine.testing.multiprocess import run_distributed
from engine.config.train import TrainConfig

MODEL = dict(hidden_size=128, vocab_size=256)
BASE = dict(global_batch_size=8, micro_batch_size=2, seq_len=128)

# (name, layout, train overrides): every axis, both PP schedules, ZeRO-1 on/off,
# recompute none / selective / full / remat-aware, fp32 and bf16, CP ring and all-to-all.
WORLD2 = [
    ("dp", {}, {}),
    ("ep", {"ep": 2}, {"zero1": True}),
    ("etp", {"etp": 2}, {"recompute": "full"}),
    ("tp+sp", {"tp": 2}, {"precision": "bf16"}),
    ("cp", {"cp": 2}, {"recompute": "remat_aware"}),
    ("cp a2a", {"cp": 2, "cp_mode": "a2a"}, {}),
    ("pp 1f1b", {"pp": 2}, {}),
    ("pp interleaved", {"pp": 2, "vpp": 2}, {"recompute": "selective"}),
    # The all-gather dispatcher keeps a row for every gathered slot (static shapes).
    ("ep allgather", {"ep": 2}, {}, "allgather"),
]
WORLD4 = [("tp2 x ep4 folded, zero1 bf16", {"tp": 2, "ep": 4}, {"zero1": True, "precision": "bf16"})]


def _measure_cases(rank, world, cases):
    from engine.parallel.mesh import FoldedMesh
    from engine.testing.memory_probe import measure_step
    from engine.testing.parity import synthetic_global_batch
    from engine.compose import build_trainer

    out = {}
    cfg = get_preset("tiny-moe", **MODEL)
    for name, layout, train, *dispatcher in cases:
        train_cfg = TrainConfig(**BASE, **train)
        mesh = FoldedMesh(ParallelConfig(world_size=world, **layout))
        trainer = build_trainer(cfg, train_cfg, mesh, dispatcher=(dispatcher or ["alltoall"])[0])
        batch = lambda step: synthetic_global_batch(step, train_cfg.global_batch_size,  # noqa: E731
                                                    train_cfg.seq_len, cfg.vocab_size)
        trainer.train_step(0, batch(0))          # first step: lazily created state settles
        out[name] = dict(measure_step(trainer, 1, batch(1)), pp_rank=mesh.pp_rank)
    return out


def _residuals(world, cases):
    measured = run_distributed(_measure_cases, world, cases, timeout_s=300)
    cfg = get_preset("tiny-moe", **MODEL)
    rows = []
    for name, layout, train, *dispatcher in cases:
        est = estimate_memory(cfg, ParallelConfig(world_size=world, **layout), TrainConfig(**BASE, **train),
                              dispatcher=(dispatcher or ["alltoall"])[0])
        for rank, per_case in enumerate(measured):
            got = per_case[name]
            pred = est.ranks[got["pp_rank"]]
            static_pred = pred.params + pred.grads + pred.optimizer
            static_got = got["params"] + got["grads"] + got["optimizer"]
            rows.append((name, rank, static_pred / static_got - 1,
                         pred.activations / got["activations"] - 1, pred.total / got["total"] - 1))
    print("\nlayout, rank: predicted/measured - 1 for params+grads+optimizer, activations, total")
    for name, rank, static, act, total in rows:
        print(f"  {name:<30} {rank}  {static:+.4f}  {act:+.3f}  {total:+.3f}")
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("world,cases", [(2, WORLD2), (4, WORLD4)], ids=["world2", "world4"])
def test_memory_model_matches_the_real_trainer(world, cases):
    for name, rank, static, _, total in _residuals(world, cases):
        assert abs(static) <= 0.05, (name, rank, static)
        assert abs(total) <= 0.15, (name, rank, total)
