"""Whole-model parity: run the same steps under a parallel layout and on one process,
then compare per-step losses and every gradient shard with the matching slice of the
single-process gradient (slices recorded by the parallelize functions)."""
from __future__ import annotations

import torch

from engine.compose import build_trainer
from engine.config.model import get_preset
from engine.config.train import TrainConfig
from engine.parallel.config import ParallelConfig
from engine.parallel.mesh import FoldedMesh
from engine.parallel.param_attrs import apply_slices, slices as param_slices
from engine.train.trainer import Trainer


def synthetic_global_batch(step: int, global_batch_size: int, seq_len: int, vocab_size: int,
                           seed: int = 0) -> torch.Tensor:
    """A pure function of (seed, step): the same tokens for every layout."""
    gen = torch.Generator().manual_seed(seed * 100_003 + step)
    return torch.randint(0, vocab_size, (global_batch_size, seq_len + 1), generator=gen)


def text_global_batch(step: int, global_batch_size: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """Learnable data: byte windows of a standard-library source file (present everywhere
    Python is), at offsets that are a pure function of (seed, step)."""
    import os
    import sysconfig
    with open(os.path.join(sysconfig.get_paths()["stdlib"], "argparse.py"), "rb") as f:
        data = torch.tensor(list(f.read()), dtype=torch.long)
    gen = torch.Generator().manual_seed(seed * 100_003 + step)
    starts = torch.randint(0, len(data) - seq_len - 1, (global_batch_size,), generator=gen)
    return torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()])


class GradCapturingTrainer(Trainer):
    """The production Trainer, keeping a copy of every step's reduced gradients."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.grads_per_step: list[dict[str, torch.Tensor]] = []

    def sync_grads(self) -> None:
        super().sync_grads()
        self.grads_per_step.append({name: self.optimizer.synced_grad(p).detach().clone()
                                    for name, p in self.named_params})


def train_and_capture(rank: int, world_size: int, layout: dict, model_overrides: dict,
                      train_overrides: dict, steps: int, dispatcher: str = "alltoall",
                      data: str = "random") -> dict:
    """Runs `steps` steps; returns losses, the synced gradients of every step and the
    slices that map each local tensor into the global one."""
    model_cfg = get_preset("tiny-moe", **model_overrides)
    train_cfg = TrainConfig(**train_overrides)
    mesh = FoldedMesh(ParallelConfig(world_size=world_size, **layout))
    trainer = build_trainer(model_cfg, train_cfg, mesh, dispatcher=dispatcher,
                            trainer_cls=GradCapturingTrainer)
    grads_per_step = trainer.grads_per_step
    metrics = []
    for step in range(steps):
        if data == "text":
            batch = text_global_batch(step, train_cfg.global_batch_size, train_cfg.seq_len)
        else:
            batch = synthetic_global_batch(step, train_cfg.global_batch_size, train_cfg.seq_len,
                                           model_cfg.vocab_size)
        metrics.append(trainer.train_step(step, batch))
    slices = {name: list(param_slices(p)) for name, p in trainer.named_params}
    params = {name: p.detach().clone() for name, p in trainer.named_params}
    return {"metrics": metrics, "grads": grads_per_step, "slices": slices, "params": params}


def step_errors(result: dict, reference: dict) -> list[tuple[float, str]]:
    """Per step: the largest |a - b| / scale over every gradient tensor, and where.

    scale = max(max|b| of the tensor, 1% of the largest gradient in the model). The floor
    matters for gradients that are ~0 by cancellation (a key bias shifts all scores of a
    query equally; softmax cancels it up to RoPE): their fp32 noise is set by the size of
    the terms that cancel, not by the tiny result, so their own max would inflate it.
    """
    out = []
    for local, full in zip(result["grads"], reference["grads"]):
        floor = 0.01 * max(t.abs().max().item() for t in full.values())
        worst, where = 0.0, ""
        for name, tensor in local.items():
            expected = apply_slices(full[name], result["slices"][name]).to(tensor.dtype)
            if expected.shape != tensor.shape:
                raise AssertionError(f"{name}: shard shape {tuple(tensor.shape)} != slice "
                                     f"{tuple(expected.shape)}")
            scale = max(expected.abs().max().item(), floor, 1e-12)
            err = (tensor - expected).abs().max().item() / scale
            if err > worst:
                worst, where = err, name
        out.append((worst, where))
    return out


# Tolerances (fp32). Step 0 sees identical parameters: only the order of fp32 sums differs
# (ring reductions, all-to-all permutations, blocked attention): measured <= 7e-7 of the
# tensor's largest value. Later steps start from parameters that already differ by that
# noise after Adam's normalisation, measured <= 5e-6 by step 2. Parity runs use Adam
# eps=1e-3, so near-zero gradients get smooth SGD-like updates instead of sign flips of
# size lr (which would make ~1e-4 differences that say nothing about the parallel code).
# A real bug (missing or doubled reduction, wrong scale or slice) is an O(1) error.
STEP0_TOL = 2e-6
LATER_TOL = 1e-5
LOSS_RTOL = 1e-6


def assert_parity(result: dict, reference: dict, label: str) -> float:
    """Checks per-step losses and every gradient shard; returns the step-0 error."""
    losses = [m["loss"] for m in result["metrics"]]
    expected = [m["loss"] for m in reference["metrics"]]
    for got, want in zip(losses, expected, strict=True):
        assert abs(got - want) <= LOSS_RTOL * abs(want), (label, losses, expected)
    # The global grad norm counts every parameter once whatever the layout (clipping rule).
    norms = [m["grad_norm"] for m in result["metrics"]]
    expected_norms = [m["grad_norm"] for m in reference["metrics"]]
    for got, want in zip(norms, expected_norms, strict=True):
        assert abs(got - want) <= 1e-5 * abs(want), (label, "grad_norm", norms, expected_norms)
    # Per-layer expert load: integer token counts summed in fp64 over the same routing
    # decisions (the losses above already agree), gathered from whichever stage holds each
    # layer; a layer missed or double counted by the pipeline gather is off by far more.
    for got, want in zip(result["metrics"], reference["metrics"], strict=True):
        by_layer, expected_by_layer = got["load_imbalance_by_layer"], want["load_imbalance_by_layer"]
        assert by_layer.keys() == expected_by_layer.keys(), (label, by_layer, expected_by_layer)
        for layer_id, value in by_layer.items():
            assert abs(value - expected_by_layer[layer_id]) <= 1e-9 * value, (
                label, "load_imbalance_by_layer", layer_id, by_layer, expected_by_layer)
    errors = step_errors(result, reference)
    assert errors[0][0] <= STEP0_TOL, (label, "step 0", errors[0])
    for step, (err, where) in enumerate(errors[1:], start=1):
        assert err <= LATER_TOL, (label, f"step {step}", err, where)
    return errors[0][0]
