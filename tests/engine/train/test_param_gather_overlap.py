"""train.overlap_param_gather: the ZeRO-1 parameter all-gather started by the optimizer
step and completed by forward pre-hooks trains bit-identically to the blocking gather
(the same collectives on the same buffers; only when the wait happens differs), on DP+EP,
interleaved PP and TP+EP in bf16; the gathers are still pending after a step, and a
forward alone completes every one of them (each bucket's params are waited for by the
pre-hook of the module that uses them first)."""
from __future__ import annotations

import pytest
import torch

from engine.compose import build_trainer
from engine.config.model import get_preset
from engine.config.train import TrainConfig
from engine.parallel.config import ParallelConfig
from engine.parallel.mesh import FoldedMesh
from engine.testing.multiprocess import run_distributed
from engine.testing.parity import synthetic_global_batch
from engine.data.eval_data import EvalBatch
from engine.train.evaluate import Evaluator
from engine.train.state import checkpoint_state

STEPS = 3
TRAIN = dict(global_batch_size=8, seq_len=8, lr=1e-3, eps=1e-3, warmup_steps=1, steps=STEPS,
             zero1=True, overlap_grad_reduce=True)
LAYOUTS = {"dp4-ep2": (dict(ep=2), {}, {}), "pp2-vpp2-dp2": (dict(pp=2, vpp=2), {}, {}),
           "tp2-ep2-bf16": (dict(tp=2, ep=2), dict(precision="bf16"), {}),
           # the last stage's tied head reads its embedding copy without calling it
           "pp2-tied": (dict(pp=2, ep=2), {}, dict(tie_embeddings=True))}


def _run(rank: int, world: int, layout: dict, extra: dict, model: dict, overlap: bool) -> dict:
    model_cfg = get_preset("tiny-moe", **model)
    train = TrainConfig(**TRAIN, **extra, overlap_param_gather=overlap)
    trainer = build_trainer(model_cfg, train, FoldedMesh(ParallelConfig(world_size=world, **layout)))
    out = {"metrics": [], "pending_after_step": []}
    for step in range(STEPS):
        batch = synthetic_global_batch(step, train.global_batch_size, train.seq_len, model_cfg.vocab_size)
        metrics = trainer.train_step(step, batch)
        out["metrics"].append((metrics["loss"], metrics["grad_norm"]))
        out["pending_after_step"].append(sum(b.gather_work is not None for b in trainer.optimizer.buckets))
    # A forward alone completes every gather, through the modules' pre-hooks.
    tokens = synthetic_global_batch(99, train.global_batch_size, train.seq_len, model_cfg.vocab_size)
    weights = torch.ones(tokens.shape)
    weights[:, 0] = 0
    out["eval_loss"] = Evaluator(trainer).mean_loss([EvalBatch(tokens, weights)])
    out["pending_after_forward"] = sum(b.gather_work is not None for b in trainer.optimizer.buckets)
    state = checkpoint_state(trainer)
    out["params"] = {k: v.clone() for k, v in state["tensors"].items() if k.startswith("model/")}
    return out


def _cases(rank: int, world: int) -> dict:
    return {(name, overlap): _run(rank, world, layout, extra, model, overlap)
            for name, (layout, extra, model) in LAYOUTS.items() for overlap in (False, True)}


@pytest.fixture(scope="module")
def results():
    return run_distributed(_cases, 4, timeout_s=600)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_overlapped_gather_trains_bit_identically(results, name):
    for rank, per_rank in enumerate(results):
        blocking, overlapped = per_rank[(name, False)], per_rank[(name, True)]
        assert overlapped["metrics"] == blocking["metrics"], (name, rank)
        assert blocking["params"].keys() == overlapped["params"].keys()
        for key, tensor in blocking["params"].items():
            assert torch.equal(tensor, overlapped["params"][key]), (name, rank, key)
        # Started by the step, completed by the next forward or the checkpoint.
        assert all(n > 0 for n in overlapped["pending_after_step"]), (name, rank)
        assert blocking["pending_after_step"] == [0] * STEPS
        assert overlapped["pending_after_forward"] == 0
        assert overlapped["eval_loss"] == blocking["eval_loss"]


def test_needs_zero1():
    with pytest.raises(ValueError, match="overlap_param_gather=true needs train.zero1=true"):
        TrainConfig(overlap_param_gather=True)
