"""Worker side of the distributed optimizer tests: trains the toy model under one layout
for several optimizer settings ("cases") and returns what the tests compare."""
from __future__ import annotations

import io
import json

import torch

from engine.optim import FoldedOptimizer
from engine.parallel.config import ParallelConfig
from engine.parallel.mesh import FoldedMesh
from engine.config.train import TrainConfig

from .toy_problem import ToyModel, init_global, run_backward

TRAIN = dict(steps=3, lr=1e-2, min_lr=1e-3, warmup_steps=1, weight_decay=0.1, grad_clip=1.0)
SMALL_BUCKET = 64      # bytes of fp32 grad: about one param per bucket, many launches


def train_config(case: dict) -> TrainConfig:
    keys = ("zero1", "overlap_grad_reduce", "precision", "grad_clip")
    return TrainConfig(**{**TRAIN, **{k: case[k] for k in keys if k in case}})


def _build(mesh: FoldedMesh, case: dict):
    model = ToyModel(mesh, init_global(mesh.config))
    if case.get("precision") == "bf16":
        model.to(torch.bfloat16)
    opt = FoldedOptimizer(list(model.named_parameters()), mesh, train_config(case),
                          bucket_bytes=case.get("bucket_bytes", 25 * 2**20))
    return model, opt


def _train(model, opt, steps, case: dict, record: dict) -> None:
    micro = case.get("micro", 1)
    for step in steps:
        opt.prepare_for_backward(micro)
        run_backward(model, step, micro, case.get("skip_col", False))
        record["grads_freed"] &= all(p.grad is None for p in model.parameters())
        record["main_grad_fp32"] &= all(p.main_grad.dtype == torch.float32 for p in model.parameters())
        record["launched_in_backward"].append(opt.launched_in_backward)
        before = opt.mesh.traffic.snapshot()
        opt.finish_grad_sync()
        record["norms"].append(float(opt.clip_grad_norm(opt.cfg.grad_clip)))
        opt.step(step)
        record["comm"].append(opt.mesh.traffic.since(before))


def _serialize(state: dict) -> dict:
    """What a checkpoint does to the state: tensors through torch.save, the rest through JSON."""
    buffer = io.BytesIO()
    torch.save({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, buffer)
    buffer.seek(0)
    out = torch.load(buffer, weights_only=True)
    out.update(json.loads(json.dumps({k: v for k, v in state.items() if not isinstance(v, torch.Tensor)})))
    return out


def run_case(mesh: FoldedMesh, case: dict) -> dict:
    record = {"norms": [], "launched_in_backward": [], "comm": [], "grads_freed": True,
              "main_grad_fp32": True}
    model, opt = _build(mesh, case)
    steps = list(range(TRAIN["steps"]))
    resume_at = case.get("resume_at")
    if resume_at is None:
        _train(model, opt, steps, case, record)
    else:
        _train(model, opt, steps[:resume_at], case, record)
        state = _serialize(opt.state_dict())
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        model, opt = _build(mesh, case)      # fresh init: everything must come from the state
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(weights[name])
        opt.load_state_dict(state)
        _train(model, opt, steps[resume_at:], case, record)
    record["num_buckets"] = len(opt.buckets)
    record["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = opt.state_dict()
    record["main_params"] = {n: state[f"main_param/{n}"] for n, _ in model.named_parameters()
                             if f"main_param/{n}" in state}
    return record


def layout_worker(rank: int, world: int, layout: dict, cases: dict[str, dict]) -> dict:
    mesh = FoldedMesh(ParallelConfig(world_size=world, **layout))
    return {name: run_case(mesh, case) for name, case in cases.items()}
