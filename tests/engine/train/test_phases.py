"""The step's phases and their axes: from the layout alone, and as the Trainer reports
them to its listener during a real step (one process)."""
from __future__ import annotations

import pytest

from engine.parallel.config import ParallelConfig
from engine.testing.multiprocess import run_distributed
from engine.train.phases import phase_axes


def test_axes_of_each_phase_follow_the_layout():
    tiny = phase_axes(ParallelConfig(world_size=4, tp=2, ep=4))       # the quick start
    assert tiny["forward"] == tiny["backward"] == ("tp", "ep")
    assert tiny["grad_sync"] == ("dp",) and tiny["metrics"] == ("dp",)
    piped = phase_axes(ParallelConfig(world_size=8, tp=2, cp=2, pp=2, ep=2))
    assert piped["forward_backward"] == ("tp", "cp", "ep", "pp") and piped["optimizer"] == ("dp", "pp")
    alone = phase_axes(ParallelConfig(world_size=1))
    assert all(axes == () for axes in alone.values())


def _record_phases(rank: int, world: int) -> list:
    from engine.compose import build_trainer
    from engine.config.train import TrainConfig
    from engine.config.model import get_preset
    from engine.parallel.mesh import FoldedMesh
    from engine.testing.parity import synthetic_global_batch

    model = get_preset("tiny-moe", num_layers=2)
    train = TrainConfig(global_batch_size=2, micro_batch_size=1, seq_len=16, steps=1)
    trainer = build_trainer(model, train, FoldedMesh(ParallelConfig(world_size=world, ep=world)))
    seen = []
    trainer.phase_listener = lambda phase, axes: seen.append((phase, axes))
    trainer.train_step(0, synthetic_global_batch(0, 2, 16, model.vocab_size))
    return seen


@pytest.mark.slow
def test_the_trainer_reports_every_phase_of_a_step_in_order():
    (seen,) = run_distributed(_record_phases, 1)
    assert [p for p, _ in seen] == ["data", "forward", "backward", "forward", "backward",
                                    "grad_sync", "optimizer", "metrics"]
    assert all(axes == () for _, axes in seen)     # one rank: no collective
