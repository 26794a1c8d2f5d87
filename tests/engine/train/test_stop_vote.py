"""The preemption vote rides in the step's metric reduction (workers/preemption.py): one
rank's vote reaches every rank at the same step, over the stage SUM and the pp all-gather,
with no extra host read."""
import pytest

from engine.compose import build_trainer
from engine.config.model import get_preset
from engine.config.train import TrainConfig
from engine.parallel.config import ParallelConfig
from engine.parallel.mesh import FoldedMesh
from engine.testing.multiprocess import run_distributed
from engine.testing.parity import synthetic_global_batch

from .test_step_metrics import TRAIN, CountingTrainer

VOTERS = {0: None, 1: 3, 2: 0}     # step -> the one rank that votes (None: nobody)


def _worker(rank, world, layout):
    cfg = get_preset("tiny-moe")
    mesh = FoldedMesh(ParallelConfig(world_size=world, **layout))
    trainer = build_trainer(cfg, TrainConfig(**TRAIN), mesh, trainer_cls=CountingTrainer)
    votes = []
    for step, voter in VOTERS.items():
        metrics = trainer.train_step(step, synthetic_global_batch(step, 4, 16, cfg.vocab_size),
                                     stop_requested=lambda: rank == voter)
        votes.append(metrics["stop_votes"])
    return {"votes": votes, "reads": trainer.metric_reads}


@pytest.mark.slow
def test_one_ranks_vote_reaches_every_rank_at_that_step():
    results = run_distributed(_worker, 4, dict(pp=2, ep=2), timeout_s=300)   # stage of 2, pp 2
    for rank, out in enumerate(results):
        assert [v > 0 for v in out["votes"]] == [False, True, True], (rank, out["votes"])
        assert out["reads"] == [1, 1, 1], (rank, out["reads"])    # still one host read a step
