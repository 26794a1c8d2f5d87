"""Whole-model parity: run the same steps under a parallel layout and on one process,
then compare per-step losses and every gradient shard with the matching slice of the
single-process gradient (slices recorded by the parallelize functions)."""
from __future__ import annotations

import torch

from engine.models.config import get_preset
from engine.parallel.config import ParallelConfig
from engine.parallel.mesh import FoldedMesh
from engine.parallel.param_attrs import apply_slices
from engine.train.config import TrainConfig
from engine.train.trainer import Trainer


def synthetic_global_batch(step: int, global_batch_size: int, seq_len: int, vocab_size: int,
                           seed: int = 0) -> torch.Tensor:
    """A pure function of (seed, step): the same tokens for every layout."""
    gen = torch.Generator().manual_seed(seed * 100_003 + step)
    return torch.randint(0, vocab_size, (global_batch_size, seq_len + 1), generator=gen)


def train_and_capture(rank: int, world_size: int, layout: dict, model_overrides: dict,
                      train_overrides: dict, steps: int, dispatcher: str = "alltoall") -> dict:
    """Runs `steps` steps; returns losses, the synced gradients of every step and the
    slices that map each local tensor into the global one."""
    model_cfg = get_preset("tiny-moe", **model_overrides)
    train_cfg = TrainConfig(**train_overrides)
    mesh = FoldedMesh(ParallelConfig(world_size=world_size, **layout))
    trainer = Trainer(model_cfg, mesh.config, train_cfg, mesh, dispatcher=dispatcher)
    grads_per_step: list[dict[str, torch.Tensor]] = []
    trainer.on_grads_synced = lambda t: grads_per_step.append(
        {name: t.optimizer.synced_grad(p).detach().clone() for name, p in t.named_params})
    metrics = []
    for step in range(steps):
        batch = synthetic_global_batch(step, train_cfg.global_batch_size, train_cfg.seq_len,
                                       model_cfg.vocab_size)
        metrics.append(trainer.train_step(step, batch))
    slices = {name: list(getattr(p, "foldmoe_slices", ())) for name, p in trainer.named_params}
    params = {name: p.detach().clone() for name, p in trainer.named_params}
    return {"metrics": metrics, "grads": grads_per_step, "slices": slices, "params": params}


def max_relative_error(result: dict, reference: dict, key: str = "grads") -> tuple[float, str]:
    """Largest |a - b| / (|b|_max + tiny) over every tensor of every step; with its name."""
    worst, where = 0.0, ""
    pairs = zip(result[key], reference[key]) if key == "grads" else [(result[key], reference[key])]
    for step, (local, full) in enumerate(pairs):
        for name, tensor in local.items():
            expected = apply_slices(full[name], result["slices"][name]).to(tensor.dtype)
            if expected.shape != tensor.shape:
                raise AssertionError(f"{name}: shard shape {tuple(tensor.shape)} != slice "
                                     f"{tuple(expected.shape)}")
            scale = expected.abs().max().item() + 1e-12
            err = (tensor - expected).abs().max().item() / scale
            if err > worst:
                worst, where = err, f"step {step} {name}"
    return worst, where
